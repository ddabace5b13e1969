"""The site worker as its SuperNode's executor: the pieces a deployment test can't
pin down cheaply (FAB code check, message kinds, the SuperNode launcher's options
and its fleet-poll patch). The end-to-end path, a killed worker included, is
``tests/simulations/test_site_supernode.py``."""

from __future__ import annotations

import inspect
import io
import time
import zipfile
from pathlib import Path

import pytest

from fedlora.client import supernode, task_loop, task_records
from fedlora.client.worker_link import code_hash

ROOT = Path(__file__).resolve().parents[2]


def _fab_of_repo() -> bytes:
    """The FAB ``flwr run`` ships for this repository (Flower's own builder)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(ROOT)


@pytest.fixture(scope="module")
def repo_fab() -> bytes:
    # Flower's builder asks pathspec for a deprecated pattern name, once per line
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="GitWildMatchPattern", category=DeprecationWarning
        )
        return _fab_of_repo()


def test_the_fab_flwr_run_ships_has_the_worker_s_code_hash(repo_fab: bytes) -> None:
    assert task_loop.fab_code_hash(repo_fab) == code_hash()
    task_loop.check_fab(repo_fab)  # accepted


def test_a_fab_with_one_changed_source_is_refused_naming_both(repo_fab: bytes) -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(repo_fab)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "fedlora/client/handlers.py":
                data += b"\n# shipped by the server\n"
            dst.writestr(item, data)
    changed = out.getvalue()
    shipped = task_loop.fab_code_hash(changed)
    assert shipped is not None and shipped != code_hash()
    with pytest.raises(task_loop.FabRefused) as err:
        task_loop.check_fab(changed)
    assert shipped[:12] in str(err.value) and code_hash()[:12] in str(err.value)


def test_a_fab_of_another_app_is_refused() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as fab:
        fab.writestr("other/app.py", "app = None\n")
    assert task_loop.fab_code_hash(out.getvalue()) is None
    with pytest.raises(task_loop.FabRefused, match="no fedlora package"):
        task_loop.check_fab(out.getvalue())


@pytest.mark.parametrize(
    ("message_type", "kind"),
    [("train", "train"), ("evaluate", "evaluate"), ("query", "query"),
     ("train.dp", "train")],
)  # fmt: skip
def test_message_kind(message_type: str, kind: str) -> None:
    assert task_loop.message_kind(message_type) == kind


def test_no_orphaned_task_means_nothing_to_fail(tmp_path: Path) -> None:
    assert not task_records.fail_orphaned_task(tmp_path, "127.0.0.1:1", "gone")


def test_quick_idle_shortens_both_waits_and_keeps_the_rest_of_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    quick = supernode.QuickIdle(0.7)
    quick.sleep(3)  # the idle poll of the SuperLink
    quick.sleep(0.5)  # a look at the SuperNode's own state: a message is handled
    quick.sleep(0.01)
    for _ in range(6):  # idle again: soon after the message, then backing off
        quick.sleep(3)
    assert slept[:3] == [0.7, supernode.QuickIdle.LOCAL_WAIT, 0.01]
    assert slept[3:] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.7, 0.7])
    assert quick.monotonic is time.monotonic
    assert quick.time is time.time


def test_the_patched_flower_loop_still_sleeps_3_s_when_idle() -> None:
    """Guard for a Flower upgrade: the patch targets this very call."""
    from flwr.supernode import start_client_internal as sci

    source = inspect.getsource(sci.start_client_internal)
    assert f"time.sleep({supernode.QuickIdle.IDLE:g})" in source
    assert "pull_objects(" in inspect.getsource(sci._pull_and_store_message)
    original_time, original_pull = sci.time, sci.pull_objects
    try:
        supernode.patch_fleet_poll(0.2)
        assert isinstance(sci.time, supernode.QuickIdle) and sci.time.poll == 0.2
        assert sci.pull_objects.keywords["initial_backoff"] == 0.05
        supernode.patch_fleet_poll(0.5)  # twice: still one layer
        assert sci.pull_objects.func is original_pull
    finally:
        sci.time, sci.pull_objects = original_time, original_pull  # type: ignore[assignment]


def test_the_launcher_refuses_subprocess_isolation(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit):
        supernode.main(
            ["--insecure", "--node-config", f"state-dir='{tmp_path}'",
             "--isolation", "subprocess"]
        )  # fmt: skip
    assert "isolation process" in capsys.readouterr().err


def test_the_launcher_needs_a_state_dir(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        supernode.main(["--insecure", "--node-config", "partition-id=0"])
    assert "state-dir=<directory>" in capsys.readouterr().err


def test_the_launcher_refuses_a_fleet_poll_out_of_range(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        supernode.main(["--fleet-poll", "0"])
    assert "--fleet-poll" in capsys.readouterr().err


def test_the_worker_command_runs_tasks_and_follows_its_parent() -> None:
    cmd = supernode.worker_command("/var/lib/s", "127.0.0.1:9094", "", 42)
    assert cmd[1:4] == ["-m", "fedlora.client.worker", "serve"]
    assert cmd[cmd.index("--runtime-api-address") + 1] == "127.0.0.1:9094"
    assert cmd[cmd.index("--parent-pid") + 1] == "42"
    assert "--runtime-root-certificates" not in cmd
    tls = supernode.worker_command("/s", "h:1", "ca.crt", 1)
    assert tls[tls.index("--runtime-root-certificates") + 1] == "ca.crt"


def test_a_failed_task_loop_stops_the_worker(tmp_path: Path) -> None:
    """Else the worker would answer its socket but never run a task again."""
    from fedlora.client.worker import Worker

    worker = Worker(tmp_path, idle_exit=0.0)
    loop = task_loop.TaskLoop(worker, "127.0.0.1:1")

    def broken() -> None:
        raise RuntimeError("boom")

    loop.run = broken  # type: ignore[method-assign]
    task_loop.start(loop).join(timeout=10)
    assert worker.stopping.is_set()
