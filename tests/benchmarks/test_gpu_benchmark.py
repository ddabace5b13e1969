"""benchmarks/gpu.py: the CUDA benchmark's stages run in its CPU smoke mode (tiny
shapes, the same code path), and on a GPU when one is visible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu import summarize

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *extra: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path / "out"),
         "--work", str(tmp_path / "work"), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    failed = {k: v for k, v in results["stages"].items() if v["status"] != "ok"}
    assert done.returncode == 0 and not failed, json.dumps(failed)[-4000:]
    return results


@pytest.mark.slow
@pytest.mark.bnb
def test_smoke_mode_runs_every_training_stage(tmp_path: Path) -> None:
    results = _run(tmp_path, "--smoke", "--only", "env,build,bench")
    stages = results["stages"]
    assert list(stages) == [
        "env", "build", "bench_nf4", "bench_bf16", "bench_nf4_dp", "bench_nf4_gc",
        "bench_bf16_gc",
    ]  # fmt: skip
    assert stages["bench_nf4_gc"]["result"]["gradient_checkpointing"] is True
    nf4 = stages["bench_nf4"]["result"]
    full = stages["bench_bf16"]["result"]
    dp = stages["bench_nf4_dp"]["result"]
    # the NF4 runs quantise every linear layer but the LM head; the other does not
    assert nf4["linear4bit_layers"] == 7 * 2 == dp["linear4bit_layers"]
    assert full["linear4bit_layers"] == 0
    # LoRA r=4 on the 7 linear layers of 2 blocks (hidden 64, MLP 128, 2 KV heads)
    per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + 3 * (64 + 128))
    assert nf4["trainable_params"] == 2 * per_block == dp["trainable_params"]
    assert all(s["result"]["losses_finite"] for k, s in stages.items() if "bench" in k)
    assert 0 < dp["dp_epsilon"] < float("inf")
    summary = results["summary"]
    assert summary["dp_over_nf4_time"] == pytest.approx(
        dp["s_per_step"] / nf4["s_per_step"], abs=1e-3
    )


def test_summary_reports_ratios_only_for_stages_that_ran() -> None:
    ok = {"status": "ok", "result": {"s_per_step": 0.2, "peak_gib_training": 3.0}}
    results = {
        "stages": {
            "bench_nf4": ok,
            "bench_bf16": {
                "status": "ok",
                "result": {"s_per_step": 0.1, "peak_gib_training": 6.0},
            },
            "bench_nf4_dp": {"status": "failed"},
        }
    }
    summary = summarize(results)
    assert summary["nf4_over_bf16_time"] == 2.0
    assert summary["nf4_over_bf16_peak_memory"] == 0.5
    assert summary["dp_over_nf4_time"] is None
    assert summary["e2e_ok"] is False


@pytest.mark.slow
@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device"
)
def test_on_a_gpu_checkpointed_nf4_needs_less_memory(tmp_path: Path) -> None:
    # without checkpointing, float32 activations outweigh NF4's saving (README)
    results = _run(tmp_path, "--only", "env,build,bench_nf4_gc,bench_bf16_gc")
    summary = results["summary"]
    assert summary["nf4_gc_over_bf16_gc_peak_memory"] < 1.0
