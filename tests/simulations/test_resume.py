"""Server durability: kill a run after round 1, resume it, get the same adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = (
    "model=tiny_llama",
    "model.tiny_hidden_size=64",
    "data=synthetic_instruct",
    "data.partitioner=iid",
    "data.num_examples=300",
    "federation=smoke",
    "federation.rounds=3",
    "train.batch_size=4",
)
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def _cmd(run_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "simulations.run",
        f"hydra.run.dir={run_dir}",
        *OVERRIDES,
    ]


def _kill_run(proc: subprocess.Popen[str], run_dir: Path) -> None:
    """SIGKILL the launcher and everything it started (a crash, no cleanup)."""
    victims = {proc.pid}
    try:
        victims |= {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    # Ray re-parents its actors to PID 1; they inherit FLWR_HOME=<run>/flwr
    victims |= {p.pid for p in psutil.process_iter() if _mentions(p, run_dir)}
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _rounds(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["round"] for x in lines if x.strip()]


def test_a_run_killed_after_round_1_resumes_to_the_same_final_adapter(
    tmp_path: Path,
) -> None:
    whole = tmp_path / "whole"
    done = subprocess.run(
        _cmd(whole), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420
    )
    assert done.returncode == 0, done.stderr[-3000:]

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(
        _cmd(crashed),
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    marker = crashed / "checkpoints" / "round-001" / "state.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "round 1 never finished"
    _kill_run(proc, crashed)
    assert not (crashed / "checkpoints" / "round-003" / "state.json").exists()

    resumed = subprocess.run(
        [sys.executable, "-m", "simulations.resume", str(crashed)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    assert _rounds(crashed) == [0, 1, 2, 3]  # no completed round lost or repeated
    want = load_file(str(whole / "checkpoints" / "round-003" / "global.safetensors"))
    got = load_file(str(crashed / "checkpoints" / "round-003" / "global.safetensors"))
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert any(want[k].abs().sum() > 0 for k in want if "lora_B" in k)  # it trained
    time.sleep(1)
    assert not [p.pid for p in psutil.process_iter() if _mentions(p, crashed)]


def _mentions(proc: psutil.Process, run_dir: Path) -> bool:
    try:
        text = " ".join(proc.cmdline()) + " ".join(proc.environ().values())
    except psutil.Error:
        return False
    return str(run_dir) in text and proc.pid != os.getpid()
