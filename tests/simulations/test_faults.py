"""Faults in a real deployment: a site (SuperNode and its worker, started with the
site command) killed mid-round is dropped for that round, the round completes
with the others, and the restarted site rejoins later rounds."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from tiny_configs import metrics_rows

from fedlora.config.flat import build_config
from simulations.deployment import LocalDeployment
from simulations.experiment import write_run_config
from strategies.config import ExperimentConfig

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_a_site_killed_mid_round_is_dropped_and_rejoins_after_restart(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    cfg = build_config(
        ExperimentConfig,
        {
            "model.name": "tiny_llama",
            "model.tiny_hidden_size": 64,
            "data.source": "synthetic_instruct",
            "data.task": "causal_lm",
            "data.partitioner": "iid",
            "data.num_examples": 300,
            "federation.clients": 3,
            "federation.min_clients": 2,
            "federation.rounds": 6,  # rounds take seconds: time for the restart
            "federation.local_steps": 3,
            "federation.round_timeout": 120,
            "train.batch_size": 4,
            "output_dir": str(run_dir),
        },
    )
    write_run_config(cfg, tmp_path / "run.toml")
    events: list[str] = []
    with LocalDeployment(tmp_path / "deploy", sites=3) as dep:
        node_config = (
            "partition-id={0} num-partitions=3 state-dir='" + str(tmp_path) + "/s{0}'"
        )
        for site in range(3):
            dep.register(site)
            dep.start_site(site, node_config.format(site), in_worker=True)

        def chaos() -> None:
            log = dep.work_dir / "site-2.log"
            deadline = time.monotonic() + 400
            while time.monotonic() < deadline:  # kill site 2 once it got round 1
                if log.exists() and "Received" in log.read_text():
                    os.killpg(dep.site_procs[2].pid, signal.SIGKILL)
                    events.append("killed")
                    break
                time.sleep(0.1)
            while time.monotonic() < deadline:  # bring it back after round 1
                if len(metrics_rows(run_dir)) >= 2:
                    dep.restart_site(2, node_config.format(2), in_worker=True)
                    events.append("restarted")
                    return
                time.sleep(0.2)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        done = dep.run(ROOT, tmp_path / "run.toml", timeout=560)
        thread.join(timeout=5)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert not dep.leftovers()
    assert events == ["killed", "restarted"]
    rows = metrics_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    first = rows[1]
    assert first["clients"] == 2 and first["clients_sampled"] == 3
    reasons = [d["reason"] for d in first["dropped"]]  # type: ignore[union-attr]
    assert len(reasons) == 1 and "Node Unavailable" in reasons[0]
    assert max(int(r["clients"]) for r in rows[2:]) == 3  # type: ignore[call-overload]
