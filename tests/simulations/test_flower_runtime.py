"""LocalSimulation: a private SuperLink runs a toy app and leaves no process behind.

The toy app (``toyapp/``) imports only numpy and flwr; one run takes ~15 s on 2 CPU
cores, most of it Ray start-up inside ``flwr-simulation``.
"""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from simulations.flower_runtime import LocalSimulation

TOYAPP = Path(__file__).resolve().parent / "toyapp"
USER_FLWR_HOME = Path.home() / ".flwr"


def _write_toml(path: Path, values: dict[str, object]) -> Path:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def _assert_all_dead(pids: set[int]) -> None:
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid}: {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    assert not alive, alive


def _ray_or_flower_pids() -> set[int]:
    """Live processes whose command line names Ray or Flower (Ray's agents too:
    ``ray::DashboardAgent`` carries neither our marker nor the Ray temp dir)."""
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or []).lower()
        if proc.info["status"] != psutil.STATUS_ZOMBIE and (
            "ray" in cmd or "flwr" in cmd or "flower" in cmd
        ):
            found.add(proc.pid)
    return found


def test_toy_app_runs_two_rounds_and_leaves_nothing_behind(tmp_path: Path) -> None:
    user_home_existed = USER_FLWR_HOME.exists()
    before = _ray_or_flower_pids()
    out_file = tmp_path / "result.json"
    run_config = _write_toml(tmp_path / "run.toml", {"out-file": str(out_file)})
    lines: list[str] = []
    pids: set[int] = set()
    with LocalSimulation(work_dir=tmp_path / "sim", log=lines.append) as sim:
        pids |= {p.pid for p in sim.owned_processes()}  # SuperLink + SuperExec
        code = sim.run(
            TOYAPP, run_config=run_config, num_supernodes=2, log_file=tmp_path / "log"
        )
        pids |= {p.pid for p in sim.owned_processes()}
        ray_tmpdir = sim.ray_tmpdir

    assert code == 0
    result = json.loads(out_file.read_text())
    assert result["rounds"] == [1, 2]
    assert result["final_mean"] == pytest.approx(2.0)  # zeros + 1 per round
    assert any("Successfully started run" in line for line in lines)
    assert "[ROUND 2/2]" in (tmp_path / "log").read_text()
    assert (tmp_path / "sim" / "superlink.log").is_file()
    assert ray_tmpdir is not None and not ray_tmpdir.exists()
    assert len(pids) >= 2
    _assert_all_dead(pids)
    _assert_all_dead(_ray_or_flower_pids() - before)  # nothing of ours, found or not
    log = (tmp_path / "sim" / "ray-head.log").read_text()
    assert "Ray runtime started." in log  # the private head, not ray.init's
    # no log monitor: what the client actors printed is copied out of Ray's dir
    kept = "".join(
        p.read_text() for p in (tmp_path / "sim" / "client_logs").glob("worker-*")
    )
    assert "toy client 0 trained" in kept and "toy client 1 trained" in kept
    assert "toy client" not in (tmp_path / "log").read_text()
    assert USER_FLWR_HOME.exists() == user_home_existed


def test_live_client_logs_stream_into_the_run_log(tmp_path: Path) -> None:
    """``live_client_logs`` (the launcher's verbose mode) keeps Ray's log
    monitor: the actors' lines arrive with the run's own."""
    run_config = _write_toml(tmp_path / "run.toml", {"num-server-rounds": 1})
    sim = LocalSimulation(
        work_dir=tmp_path / "sim", log=lambda _: None, live_client_logs=True
    )
    with sim:
        sim.run(
            TOYAPP, run_config=run_config, num_supernodes=2, log_file=tmp_path / "log"
        )
    log = (tmp_path / "log").read_text()
    assert "toy client 0 trained" in log and "toy client 1 trained" in log


def test_undeclared_run_config_key_fails_with_the_key_name(tmp_path: Path) -> None:
    run_config = _write_toml(tmp_path / "bad.toml", {"no-such-key": 1})
    with LocalSimulation(work_dir=tmp_path / "sim", log=lambda _: None) as sim:
        pids = {p.pid for p in sim.owned_processes()}
        with pytest.raises(RuntimeError, match="no-such-key") as err:
            sim.run(TOYAPP, run_config=run_config, num_supernodes=2)
    assert "Invalid run configuration" in str(err.value)
    _assert_all_dead(pids)


def test_a_crashed_server_app_fails_the_run_with_its_error(tmp_path: Path) -> None:
    """The final status (read in-process from the SuperLink) tells a crash from a
    completed run, and the streamed log carries the ServerApp's error."""
    run_config = _write_toml(tmp_path / "crash.toml", {"crash": True})
    with LocalSimulation(work_dir=tmp_path / "sim", log=lambda _: None) as sim:
        with pytest.raises(RuntimeError, match="finished:failed") as err:
            sim.run(TOYAPP, run_config=run_config, num_supernodes=2)
    assert "toy ServerApp asked to crash" in str(err.value)


def test_a_run_ends_at_the_apps_last_line(tmp_path: Path) -> None:
    """With ``last_line`` the run is complete once the app logged it: the
    ServerApp, which lingers for 10 minutes after it, is killed with everything
    else instead of being waited for."""
    import time

    before = _ray_or_flower_pids()
    out_file = tmp_path / "result.json"
    values = {"out-file": str(out_file), "num-server-rounds": 1, "linger": 600.0}
    run_config = _write_toml(tmp_path / "run.toml", values)
    start = time.monotonic()
    with LocalSimulation(work_dir=tmp_path / "sim", log=lambda _: None) as sim:
        code = sim.run(
            TOYAPP,
            run_config=run_config,
            num_supernodes=2,
            log_file=tmp_path / "log",
            last_line="toy: finished",
        )
        assert not sim.owned_processes()  # stopped at once, inside the block
    assert time.monotonic() - start < 300  # far from the 600 s linger
    assert code == 0
    assert json.loads(out_file.read_text())["rounds"] == [1]
    assert (tmp_path / "log").read_text().rstrip().endswith("toy: finished")
    _assert_all_dead(_ray_or_flower_pids() - before)


def test_the_log_stream_stops_at_the_last_line() -> None:
    """``stream_logs(until=...)`` leaves the stream at the line that holds it,
    even when the line is split across chunks, and reads no further."""
    from types import SimpleNamespace

    from simulations.run_logs import stream_logs

    chunks = ["INFO : a\nINFO : all ", "done here\nINFO : after\n", "never"]
    read: list[str] = []

    def responses(_request: object) -> object:
        for chunk in chunks:
            read.append(chunk)
            yield SimpleNamespace(log_output=chunk)

    client = SimpleNamespace(StreamLogs=responses)
    lines: list[str] = []
    assert stream_logs(client, 1, lines.append, until="all done")  # type: ignore[arg-type]
    assert lines == ["INFO : a", "INFO : all done here"]
    assert read == chunks[:2]
    lines.clear()
    assert not stream_logs(client, 1, lines.append, until="missing")  # type: ignore[arg-type]
    assert lines == ["INFO : a", "INFO : all done here", "INFO : after", "never"]


def test_log_lines_are_whole_across_chunks() -> None:
    """The SuperLink sends the log in chunks that may split a line."""
    from simulations.run_logs import LineSplitter

    lines: list[str] = []
    split = LineSplitter(lines.append)
    for chunk in ("INFO : a\nINFO : b", "c\r\n", "", "\nlast"):
        split.feed(chunk)
    assert lines == ["INFO : a", "INFO : bc", ""]
    split.close()
    assert lines == ["INFO : a", "INFO : bc", "", "last"]


def test_run_outside_with_block_is_refused(tmp_path: Path) -> None:
    sim = LocalSimulation(work_dir=tmp_path / "sim")
    with pytest.raises(RuntimeError, match="not running"):
        sim.run(TOYAPP, run_config=tmp_path / "x.toml", num_supernodes=2)


# Flower's own builder asks pathspec for a deprecated pattern name, once per line
@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")
def test_the_staged_app_is_the_fab_flwr_run_builds_from_the_checkout(
    tmp_path: Path,
) -> None:
    """``flwr run`` of the staged copy ships exactly what ``flwr run .`` would."""
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from simulations.flwr_cli import stage_app

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "stale.py").write_text("")  # of an earlier run: removed
    staged = stage_app(root, tmp_path / "app")
    assert staged == tmp_path / "app"

    def contents(fab: bytes) -> dict[str, bytes]:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            return {n: z.read(n) for n in z.namelist() if not n.startswith(".info")}

    want = contents(build_fab_from_disk(root))
    got = contents(build_fab_from_disk(staged))
    assert got == want
    assert "fedlora/client/app.py" in got and not any(".venv" in n for n in got)


@pytest.mark.parametrize(
    ("script", "error"),
    [
        ("echo 'Ray runtime started.'", None),
        ("echo 'Ray runtime started.'; exit 3", "exited with code 3"),
        ("echo 'port taken'", "exited with code 0 without starting"),
    ],
)
def test_the_ray_head_is_ready_only_when_ray_start_said_so_and_succeeded(
    tmp_path: Path, script: str, error: str | None
) -> None:
    """``wait_ready`` trusts neither a zero exit alone nor the line alone, and
    quotes what ``ray start`` printed when it failed."""
    from simulations.ray_head import PrivateRayHead

    fake = tmp_path / "ray"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(0o755)
    log = tmp_path / "ray-head.log"
    log.write_text("Ray runtime started.\n")  # a previous head's: not this one's
    head = PrivateRayHead(tmp_path / "r", log, live_logs=False)
    head.start(str(fake), {"env": {}})
    if error is None:
        head.wait_ready(timeout=10)
    else:
        with pytest.raises(RuntimeError, match=error) as err:
            head.wait_ready(timeout=10)
        assert str(log) in str(err.value)
