"""What averaging each LoRA family's tensors costs against averaging the updates.

A client's adapted matrix is, per family (row norms for DoRA, VeRA's shared
projections sliced to the matrix)::

    LoRA  W'_i = W + s B_i A_i
    DoRA  W'_i = m_i * (W + s B_i A_i) / ||W + s B_i A_i||
    VeRA  W'_i = W + diag(lambda_b,i) B diag(lambda_d,i) A

FedAvg averages the trained tensors separately, so the merged ``W'`` is not
``mean_i W'_i``. For each setting this trains one round of three tiny-Llama
clients (NF4 base, r = 4 on q_proj and up_proj, different data) through the
clients' own code (``train_round``), merges their replies with the server's
averaging, and reports per adapted matrix (median and max over matrices)::

    gap = ||W'(merged tensors) - mean_i W'_i||_F / ||mean_i W'_i - W||_F

in float64 from the dequantised base, i.e. the error of the merge relative to the
size of the round's ideal update, and the bytes one client sends per round.

Settings: each family with ``adapter=lora`` (both factors trained: the cross term
of factor-wise averaging is part of the gap) and ``adapter=ffa`` (A, or VeRA's
lambda_d, frozen and shared: plain LoRA and VeRA are then exact, so what is left
under DoRA is the row normalisation and the magnitude alone), at 1, 5 and 20 local
steps, at the default learning rate; VeRA also at ten times it, the scale its
paper trains at::

    python -m benchmarks.family_merge [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from benchmarks.output import write_result
from fedlora.cache import model_bundle
from fedlora.client.round import train_round
from fedlora.client.site import SiteConfig
from fedlora.client.worker import reset_process_state
from fedlora.config.flat import build_config
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    MAGNITUDE,
    VERA_B,
    VERA_D,
    adapter_state,
    fingerprint,
    select,
)
from fedlora.lora.variants import VARIANTS
from strategies.aggregation import weighted_mean
from strategies.config import ExperimentConfig

CLIENTS = 3


FAMILIES: dict[str, dict[str, Any]] = {  # name -> adapter overrides
    "lora": {},
    "dora": {"adapter.use_dora": True},
    "vera": {"adapter.peft_type": "vera"},
}
DEFAULT_LR = 2e-3


def config(family: str, variant: str, steps: int, lr: float) -> ExperimentConfig:
    """The tiny-Llama job of one setting."""
    return build_config(
        ExperimentConfig,
        {
            "model.name": "tiny_llama",
            "model.tiny_hidden_size": 64,
            "data.source": "synthetic_instruct",
            "data.task": "causal_lm",
            "data.num_examples": 600,
            "adapter.variant": variant,
            **FAMILIES[family],
            "adapter.rank": 4,
            "adapter.target_modules": ("q_proj", "up_proj"),
            "federation.clients": CLIENTS,
            "federation.local_steps": steps,
            "train.batch_size": 8,
            "train.lr": lr,
        },
    )


def full_weight(
    state: dict[str, torch.Tensor], name: str, w: torch.Tensor, s: float
) -> torch.Tensor:
    """``W'`` of matrix ``name`` in float64; the family is read from the keys."""
    if f"{name}.{VERA_D}" in state:
        d_out, d_in = w.shape
        a = state["base_model.vera_A"].double()[:, :d_in]
        b = state["base_model.vera_B"].double()[:d_out, :]
        lam_b = state[f"{name}.{VERA_B}"].double()
        lam_d = state[f"{name}.{VERA_D}"].double()
        return w.double() + lam_b[:, None] * (b * lam_d[None, :]) @ a
    v = w.double() + s * (
        state[name + B_SUFFIX].double() @ state[name + A_SUFFIX].double()
    )
    m = state.get(f"{name}.{MAGNITUDE}")
    return v if m is None else (m.double() / v.norm(dim=1))[:, None] * v


def adapted(model: Any) -> dict[str, tuple[torch.Tensor, float]]:
    """Adapted module name -> (dequantised base W (d_out, d_in), LoRA scale)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.integrations import dequantize_module_weight

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer) and hasattr(layer, "base_layer"):
            w = dequantize_module_weight(layer.base_layer).float()
            scaling = getattr(layer, "scaling", {}).get("default", 1.0)
            out[name] = (w, float(scaling))
    return out


def measure(family: str, variant: str, steps: int, lr: float) -> dict[str, Any]:
    """One round of three clients; the merge gap per matrix and bytes sent."""
    cfg = config(family, variant, steps, lr)
    reset_process_state()  # the cached model of the last setting has trained
    model = model_bundle(cfg).model
    start = adapter_state(model)
    sent = select(start, VARIANTS.get(variant).sends_down(1))
    kept = [k for k in start if k not in sent]
    fp = fingerprint(start, kept) if kept else ""
    outs = [
        train_round(cfg, SiteConfig(i, CLIENTS), 1, sent, fp) for i in range(CLIENTS)
    ]
    weights = [float(o.num_examples) for o in outs]
    merged = {**start, **weighted_mean([o.state for o in outs], weights)}
    gaps = []
    for name, (w, s) in adapted(model).items():
        ideal = sum(
            wt * full_weight({**start, **o.state}, name, w, s)
            for wt, o in zip(weights, outs, strict=True)
        ) / sum(weights)
        error = (full_weight(merged, name, w, s) - ideal).norm()
        gaps.append(float(error / (ideal - w.double()).norm()))
    up = recorddict_to_proto(RecordDict({"arrays": ArrayRecord(outs[0].state)}))
    return {
        "family": family,
        "variant": variant,
        "local_steps": steps,
        "lr": lr,
        "gap_median": statistics.median(gaps),
        "gap_max": max(gaps),
        "matrices": len(gaps),
        "bytes_up_per_client": up.ByteSize(),
        "tensors_up": len(outs[0].state),
        "params_up": sum(v.numel() for v in outs[0].state.values()),
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.family_merge")
    parser.add_argument("--out", type=str, default=None, help="result file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = [(f, DEFAULT_LR) for f in FAMILIES] + [("vera", 10 * DEFAULT_LR)]
    settings = [
        (family, variant, steps, lr)
        for family, lr in runs
        for variant in ("lora", "ffa")
        for steps in (1, 5, 20)
    ]
    rows = []
    for setting in settings:
        row = measure(*setting)
        print(row, flush=True)
        rows.append(row)
    out = {"clients": CLIENTS, "rank": 4, "rows": rows}
    from pathlib import Path

    write_result(
        "family_merge",
        time.strftime("%Y%m%d-%H%M%S"),
        out,
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
