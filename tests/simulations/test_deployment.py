"""A real deployment on 127.0.0.1: TLS SuperLink with SuperNode authentication,
two registered sites (one with its site worker, one with a process per message),
one unregistered site that is refused, three rounds of the tiny model through
``flwr run``. The commands are the README guide's (checked below)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from tiny_configs import deployed_job

from simulations.deployment import (
    LocalDeployment,
    connection_toml,
    register_cmd,
    run_cmd,
    site_supernode_cmd,
    superlink_cmd,
    supernode_cmd,
)

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
            "data-path=/data/site-0.jsonl state-dir=/var/lib/fedlora site-worker=true",
            9094,
        ),
        site_supernode_cmd(
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
    files, run_config = deployed_job(tmp_path)
    run_dir = tmp_path / "run"
    bad = tmp_path / "bad.jsonl"  # columns the causal_lm task does not read
    bad.write_text('{"question": "2+2?", "reply": "4"}\n' * 20)
    with LocalDeployment(tmp_path / "deploy", sites=4) as dep:
        for site in (0, 1):  # site 0 with its worker, site 1 a process per message
            dep.register(site)
            worker = " site-worker=true" if site == 0 else ""
            dep.start_site(
                site,
                f"data-path='{files[f'site-{site}']}' state-dir='{tmp_path}/s{site}'"
                + worker,
            )
        dep.register(3)  # registered, but its data file cannot be used
        dep.start_site(3, f"data-path='{bad}' site-name='clinic-b'")
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
    assert all(r["clients"] == 2 for r in rows[1:])
    # the bad site is named, with the reason, and the rounds go on without it
    named = "site clinic-b: node-config data-path="
    reasons = [d["reason"] for r in rows[1:] for d in r["dropped"]]
    assert reasons and all(named in x for x in reasons)
    assert all("prompt" in x and "question" in x for x in reasons)
    assert named in done.stdout + done.stderr
    assert all(r["round_applied"] for r in rows[1:])
    assert rows[-1]["eval_perplexity"] < rows[0]["eval_perplexity"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
