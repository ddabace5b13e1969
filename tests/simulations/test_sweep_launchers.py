"""A sweep through Hydra's launcher plugins, exactly as a user starts it: joblib
(jobs in parallel on this machine) and submitit's local executor (the code path
of the SLURM launcher, jobs as local processes). Each job writes its own run
directory, parallel jobs do not collide, and the report reads the sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.report import find_jobs, write_report

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
JOB = [
    "model=tiny_llama", "data=synthetic_instruct", "federation=smoke",
    "federation.rounds=1", "federation.local_steps=2", "data.num_examples=120",
    "train.batch_size=4", "strategy=she_lora", "federation.client_ranks=[2,4]",
    "federation.fraction_evaluate=1.0",
]  # fmt: skip


def sweep(sweep_dir: Path, *launcher: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "simulations.run", "-m", *launcher, *JOB,
        f"hydra.sweep.dir={sweep_dir}", "seed=0,1",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_sweep(sweep_dir: Path) -> None:
    jobs = find_jobs(sweep_dir)
    assert sorted(j.seed for j in jobs) == [0, 1]
    (setting,) = {j.setting for j in jobs}  # one setting, two seeds
    assert "launcher" not in setting and "model=tiny_llama" in setting
    for seed in (0, 1):
        run = sweep_dir / setting / f"seed={seed}"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["seed"] == seed
        # each job its own Flower home, Ray temp dir and SHE-LoRA keys
        assert (run / "flwr" / "flwr_home").is_dir()
        assert (run / "he-keys").is_dir()
    keys = [(sweep_dir / setting / f"seed={s}" / "he-keys").iterdir() for s in (0, 1)]
    blobs = [{p.name: p.read_bytes() for p in k} for k in keys]
    assert blobs[0].keys() == blobs[1].keys() and blobs[0] != blobs[1]
    paths = write_report(sweep_dir)
    assert f"| {setting} | 2 |" in paths["md"].read_text()


def test_a_sweep_runs_its_jobs_in_parallel_with_joblib(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "joblib"
    sweep(sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    check_sweep(sweep_dir)
    # both jobs ran at the same time: each started before the other ended
    spans = []
    for seed in (0, 1):
        (run,) = sweep_dir.rglob(f"seed={seed}")
        start = (run / ".hydra" / "config.yaml").stat().st_mtime  # Hydra, at start
        spans.append((start, (run / "summary.json").stat().st_mtime))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def test_a_sweep_runs_through_submitit_like_on_slurm(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "submitit"
    sweep(sweep_dir, "hydra/launcher=submitit_local")
    check_sweep(sweep_dir)
    assert list((sweep_dir / ".submitit").rglob("*_log.out"))  # submitit's own logs
