"""A real deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication,
two registered sites (one with its site worker, one with a process per message),
one unregistered site that is refused, three rounds of the tiny model through
``flwr run``. The commands are the README guide's (checked below)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from fedlora.config.flat import build_config
from simulations.deployment import (
    LocalDeployment,
    connection_toml,
    register_cmd,
    run_cmd,
    superlink_cmd,
    supernode_cmd,
)
from simulations.experiment import write_run_config
from strategies.config import ExperimentConfig

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_the_readme_guide_shows_exactly_these_commands() -> None:
    examples = [
        superlink_cmd("certs", 8000, "state.db", "0.0.0.0"),
        register_cmd("certs/site-0.pub"),
        supernode_cmd(
            "superlink.example.org:8000",
            "certs/ca.crt",
            "certs/site-0.key",
            "data-path=/data/site-0.jsonl state-dir=/var/lib/fedlora",
            9094,
        ),
        run_cmd(".", "run.toml"),
    ]
    for cmd in examples:
        assert shlex.join(cmd) in README, shlex.join(cmd)
    assert connection_toml("superlink.example.org:8000", "certs/ca.crt") in README


@pytest.mark.slow
def test_tls_deployment_with_supernode_auth_runs_three_rounds(tmp_path: Path) -> None:
    from fedlora.data import instruct

    run_dir = tmp_path / "run"
    files = {}  # each site its own data file; the server its held-out file
    for name, seed, n in (("server", 9, 60), ("site-0", 0, 120), ("site-1", 1, 120)):
        files[name] = tmp_path / f"{name}.jsonl"
        instruct.generate(n, seed).to_json(str(files[name]))
    cfg = build_config(
        ExperimentConfig,
        {
            "model.name": "tiny_llama",
            "model.tiny_hidden_size": 64,
            "data.source": "local",
            "data.path": str(files["server"]),
            "data.task": "causal_lm",
            "data.partitioner": "iid",
            "federation.clients": 2,
            "federation.rounds": 3,
            "federation.local_steps": 3,
            "train.batch_size": 4,
            "output_dir": str(run_dir),
        },
    )
    run_config = tmp_path / "run.toml"
    write_run_config(cfg, run_config)
    with LocalDeployment(tmp_path / "deploy", sites=3) as dep:
        for site in (0, 1):  # site 0 with its worker, site 1 a process per message
            dep.register(site)
            worker = " site-worker=true" if site == 0 else ""
            dep.start_site(
                site,
                f"data-path='{files[f'site-{site}']}' state-dir='{tmp_path}/s{site}'"
                + worker,
            )
        intruder = dep.start_site(2, f"data-path='{files['site-0']}'")
        assert intruder.wait(timeout=120) != 0
        log = (dep.work_dir / "site-2.log").read_text()
        assert "Failed to activate SuperNode" in log
        done = dep.run(ROOT, run_config, timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert not dep.leftovers()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    # the worker site loads its base model once for the run; site 1 has no worker
    assert [r["client_model_loads"] for r in rows[1:]] == [1, 0, 0]
    assert all(r["clients"] == 2 and r["clients_dropped"] == 0 for r in rows[1:])
    assert all(r["round_applied"] for r in rows[1:])
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
