"""Heterogeneous ranks end to end through the real launcher: SHE-LoRA vs FlexLoRA.

Both runs use the same seed, clients of ranks 2/4/8 and federated evaluation (the
SHE-LoRA server cannot evaluate the merged model: only key holders can rebuild it).
Their merges agree up to CKKS error and the plaintext truncation to the maximum
rank, so the clients' accuracies must agree within one point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
COMMON = (
    "federation=smoke",
    "federation.clients=3",
    "federation.min_clients=3",
    "federation.fraction_evaluate=1.0",
    "federation.client_ranks=[2,4,8]",
    "adapter.rank=8",
    "data.num_examples=600",
)


def _run(run_dir: Path, *overrides: str) -> list[dict[str, Any]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [*cmd, *COMMON, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_she_lora_matches_flexlora_and_hides_the_selected_columns(
    tmp_path: Path,
) -> None:
    flex = _run(tmp_path / "flex", "strategy=flexlora")
    she = _run(tmp_path / "she", "strategy=she_lora", "strategy.he_budgets=[1,2,4]")
    assert all(r["clients_dropped"] == 0 for r in flex[1:] + she[1:])
    assert [r["clients"] for r in she[1:]] == [3, 3]
    gap = abs(she[-1]["fed_eval_accuracy"] - flex[-1]["fed_eval_accuracy"])
    assert gap <= 0.01, (she[-1], flex[-1])
    # SHE-LoRA reports its HE costs; the server saw ciphertexts, not the columns
    last = she[-1]
    assert last["he_ciphertexts_up"] >= 3 and last["he_bytes_up"] > 0
    assert 0 < last["he_plain_bytes_up"] < last["bytes_up"]
    assert 0 < last["he_encrypted_fraction"] <= 4 / 384
    assert last["eval_accuracy"] is None  # no server-side evaluation
    keys = tmp_path / "she" / "he-keys"
    assert (keys / "secret.ctx").exists() and (keys / "public.ctx").exists()
    summary = json.loads((tmp_path / "she" / "summary.json").read_text())
    assert summary["config"]["strategy"]["he_public_context"].endswith("public.ctx")
    # heterogeneous ranks really travelled: rank 2/4/8 clients, flexlora down bytes
    assert flex[1]["bytes_down"] < 3 * flex[1]["bytes_up"] * 2


def test_flora_run_saves_an_adapter_that_reproduces_the_servers_accuracy(
    tmp_path: Path,
) -> None:
    """FLoRA's residual lives beside the 4-bit base; the saved PEFT adapter is it."""
    import torch
    from peft import PeftModel

    from fedlora.cache import collator, heldout_dataset
    from fedlora.config.flat import build_config
    from fedlora.models import load_base_model
    from fedlora.train import evaluate
    from strategies.config import ExperimentConfig

    rows = _run(tmp_path / "flora", "strategy=flora")
    assert [r["clients"] for r in rows[1:]] == [3, 3]
    # round 2 sends the residual (sum of ranks 2 + 4 + 8 = 14 per matrix) down
    assert rows[2]["bytes_down"] > rows[1]["bytes_down"]
    cfg = build_config(ExperimentConfig, {"data.num_examples": 600})
    base = load_base_model(
        cfg.model, task="classification", num_labels=4, seed=cfg.seed
    )
    model = PeftModel.from_pretrained(base, tmp_path / "flora" / "adapter")
    result = evaluate(
        model,
        heldout_dataset(cfg),
        collator(cfg),
        task="classification",
        batch_size=64,
        device=torch.device("cpu"),
    )
    assert result.accuracy == pytest.approx(rows[-1]["eval_accuracy"], abs=1e-9)
    assert result.loss == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)
