"""Crashes on a real TLS deployment (127.0.0.1, real processes, sites started with
the site command ``python -m fedlora.client.supernode``): the server killed
mid-run resumes to the same adapter as an uninterrupted run; a DP site killed
(SuperNode and worker) while it holds a round's message and restarted at once
answers that message with an error (the round goes on without it, no waiting
for the round timeout) and continues its privacy accountant."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import deployed_job

from fedlora.client import worker_link
from fedlora.client.task_records import PULLED_GLOB
from simulations.deployment import LocalDeployment
from strategies.server.checkpoint import STRATEGY_FILE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def start_sites(dep: LocalDeployment, files: dict[str, Path], state: Path) -> None:
    for site in (0, 1):
        dep.register(site)
        dep.start_site(site, site_config(files, state, site), in_worker=True)


def site_config(files: dict[str, Path], state: Path, site: int) -> str:
    data = files[f"site-{site}"]
    return f"data-path='{data}' state-dir='{state}/s{site}'"


def wait_for(path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def wait_for_pulled(state_dir: Path, round_: int, timeout: float = 300.0) -> None:
    """Return once the site holds (has pulled, not answered) a ``round_`` message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in state_dir.glob(PULLED_GLOB):
            try:
                if json.loads(path.read_text()).get("group_id") == str(round_):
                    return
            except (OSError, ValueError):
                pass  # being written
        time.sleep(0.02)
    raise AssertionError(f"round {round_}'s message never reached {state_dir}")


def _alive(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` still runs after ``timeout`` s (a killed child is reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.1)
    return True


def rows(run_dir: Path) -> list[dict[str, object]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def test_server_killed_after_round_1_resumes_to_the_same_adapter(
    tmp_path: Path,
) -> None:
    files, whole_cfg = deployed_job(tmp_path / "whole")
    _, crash_cfg = deployed_job(tmp_path / "crash")
    crash_dir = tmp_path / "crash" / "run"
    resume_cfg = tmp_path / "resume.toml"
    text = crash_cfg.read_text()
    assert "resume = false\n" in text
    resume_cfg.write_text(text.replace("resume = false\n", "resume = true\n"))
    with LocalDeployment(tmp_path / "deploy", sites=2) as dep:
        start_sites(dep, files, tmp_path)
        done = dep.run(ROOT, whole_cfg, timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]

        flwr_run = dep.submit(ROOT, crash_cfg)
        wait_for(crash_dir / "checkpoints" / "round-001" / "state.json")
        dep.kill_server()  # SuperLink and ServerApp, SIGKILL
        flwr_run.kill()
        assert not (crash_dir / "checkpoints" / "round-003").exists()
        dep.start_superlink()  # same database: the sites' keys stay registered
        done = dep.run(ROOT, resume_cfg, timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert not dep.leftovers()
    assert [r["round"] for r in rows(crash_dir)] == [0, 1, 2, 3]
    final = "checkpoints/round-003/global.safetensors"
    want = load_file(str(tmp_path / "whole" / "run" / final))
    got = load_file(str(crash_dir / final))
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)  # it trained


def test_a_dp_site_killed_and_restarted_continues_its_accountant(
    tmp_path: Path,
) -> None:
    dp = {
        "privacy.mode": "dp",
        "privacy.noise_multiplier": 1.0,
        "federation.rounds": 4,  # min_clients 2: a round waits for both sites
        "federation.local_steps": 10,  # a round's message is held long enough
    }
    files, run_config = deployed_job(tmp_path, dp)
    run_dir = tmp_path / "run"
    with LocalDeployment(tmp_path / "deploy", sites=2) as dep:
        start_sites(dep, files, tmp_path)
        flwr_run = dep.submit(ROOT, run_config)
        wait_for(run_dir / "checkpoints" / "round-001" / "state.json")
        status = worker_link.ping(str(tmp_path / "s0"))
        assert status is not None
        # Flower delivers a message once: the restarted site must answer it
        wait_for_pulled(tmp_path / "s0", 2)
        dep.kill_site(0)  # SIGKILL: the SuperNode and its worker
        assert not _alive(int(status["pid"]))
        dep.restart_site(0, site_config(files, tmp_path, 0), in_worker=True)
        assert flwr_run.wait(timeout=300) == 0  # the round timeout is 3600 s
    assert not dep.leftovers()
    got = rows(run_dir)
    assert [r["clients"] for r in got[1:]] == [2, 1, 2, 2]
    # the SuperLink takes the site back only once it missed its heartbeats; the
    # server then hears "Node Unavailable", or the restarted site's own error if
    # the site came back before the server asked (that one hung for 3600 s)
    (dropped,) = got[2]["dropped"]
    reason = str(dropped["reason"])
    assert "Node Unavailable" in reason or "stopped while handling" in reason
    log = (tmp_path / "deploy" / "site-0.log").read_text()
    assert "answering 1 message(s) the previous process" in log
    assert "Cannot get processing duration" not in log
    assert not list((tmp_path / "s0").glob(PULLED_GLOB))
    # every reply's report carries the site's cumulative DP steps: per site they
    # must read c, 2c, 3c, ... over the rounds it trained (a reset would restart)
    state = torch.load(
        run_dir / "checkpoints" / "round-004" / STRATEGY_FILE, weights_only=False
    )
    steps: dict[int, list[int]] = {}
    for rnd in sorted(state["privacy"]):
        for node, report in state["privacy"][rnd].items():
            steps.setdefault(node, []).append(int(report["dp-steps"]))
    assert len(steps) == 2
    for seq in steps.values():
        assert seq == [seq[0] * (i + 1) for i in range(len(seq))], steps
    assert len(state["privacy"][4]) == 2  # the killed site trained after restart
