"""Sites started with ``python -m fedlora.client.supernode`` on a real TLS
deployment (127.0.0.1): the site worker runs every ClientApp task in-process,
loads the base model once per run, and when it is killed mid-round that round
drops the site with the reason and the next round has it back."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from tiny_configs import deployed_job, metrics_rows

from fedlora.client import worker_link
from fedlora.client.task_records import TASK_GLOB
from simulations.deployment import LocalDeployment

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def kill_worker_during_round(state_dir: Path, round_: int, timeout: float) -> int:
    """SIGKILL the site worker once it holds the ``round_`` train task; its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = []
        for task in state_dir.glob(TASK_GLOB):
            try:
                records.append(json.loads(task.read_text()))
            except (OSError, ValueError):
                pass
        if any(r.get("group_id") == str(round_) for r in records):
            status = worker_link.ping(str(state_dir))
            assert status is not None
            os.kill(int(status["pid"]), signal.SIGKILL)
            return int(status["pid"])
        time.sleep(0.02)
    raise AssertionError(f"round {round_}'s task never reached {state_dir}")


def test_site_worker_runs_the_tasks_loads_once_and_survives_a_kill(
    tmp_path: Path,
) -> None:
    # 20 local steps: the round-2 task runs long enough to be killed mid-way
    job = {
        "federation.rounds": 4,
        "federation.local_steps": 20,
        "federation.min_clients": 1,  # a round with one site left still counts
    }
    files, run_config = deployed_job(tmp_path, job)
    run_dir = tmp_path / "run"
    states = {site: tmp_path / f"s{site}" for site in (0, 1)}
    with LocalDeployment(tmp_path / "deploy", sites=2) as dep:
        for site in (0, 1):
            dep.register(site)
            data = files[f"site-{site}"]
            node = f"data-path='{data}' state-dir='{states[site]}'"
            dep.start_site(site, node, in_worker=True)
        flwr_run = dep.submit(ROOT, run_config)
        killed = kill_worker_during_round(states[0], 2, timeout=420)
        assert flwr_run.wait(timeout=480) == 0
        restarted = worker_link.ping(str(states[0]))
    assert not dep.leftovers()  # workers exit with their SuperNodes
    assert restarted is not None and restarted["pid"] != killed
    got = metrics_rows(run_dir)
    assert [r["round"] for r in got] == [0, 1, 2, 3, 4]
    # round 2 goes on without site 0, named with the reason; round 3 has it back
    assert [r["clients"] for r in got[1:]] == [2, 1, 2, 2]
    (dropped,) = got[2]["dropped"]
    assert "site worker" in dropped["reason"] and "exited with -9" in dropped["reason"]
    # each site's worker loads the base model once; the new worker once more
    assert [r["client_model_loads"] for r in got[1:]] == [2, 0, 1, 0]
    assert all(r["round_applied"] for r in got[1:])
    log = (states[0] / worker_link.LOG_NAME).read_text()
    assert "train task completed" in log
