"""What averaging DoRA's tensors costs against averaging each client's full weight.

A client's adapted matrix is ``W'_i = m_i * (W + s B_i A_i) / ||W + s B_i A_i||``
(row norms; plain LoRA: ``W + s B_i A_i``). FedAvg averages A, B and m separately,
so the merged ``W'`` is not ``mean_i W'_i``. For each setting this trains one round
of three tiny-Llama clients (NF4 base, r = 4 on q_proj and up_proj, different data)
through the clients' own code (``train_round``), merges their replies with the
server's strategy, and reports per adapted matrix (median and max over matrices)::

    gap = ||W'(merged tensors) - mean_i W'_i||_F / ||mean_i W'_i - W||_F

in float64 from the dequantised base, i.e. the error of the merge relative to the
size of the round's ideal update, and the bytes one client sends per round.

Settings: plain LoRA and DoRA, with ``adapter=lora`` (A and B trained: the LoRA
cross-term of factor-wise averaging is part of the gap) and ``adapter=ffa`` (A
frozen and shared: for plain LoRA the merge is exact, so what is left under DoRA
is the row normalisation and the magnitude alone), at 1, 5 and 20 local steps::

    python -m benchmarks.dora_merge [--out FILE]
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
from fedlora.config.flat import build_config
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    MAGNITUDE,
    adapter_state,
    fingerprint,
    select,
)
from fedlora.lora.variants import VARIANTS
from strategies.aggregation import weighted_mean
from strategies.config import ExperimentConfig

CLIENTS = 3


def config(variant: str, dora: bool, steps: int) -> ExperimentConfig:
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
            "adapter.use_dora": dora,
            "adapter.rank": 4,
            "adapter.target_modules": ("q_proj", "up_proj"),
            "federation.clients": CLIENTS,
            "federation.local_steps": steps,
            "train.batch_size": 8,
        },
    )


def full_weight(
    state: dict[str, torch.Tensor], name: str, w: torch.Tensor, s: float
) -> torch.Tensor:
    """``W'`` of matrix ``name`` (DoRA if ``state`` has its magnitude), float64."""
    v = w.double() + s * (
        state[name + B_SUFFIX].double() @ state[name + A_SUFFIX].double()
    )
    m = state.get(f"{name}.{MAGNITUDE}")
    return v if m is None else (m.double() / v.norm(dim=1))[:, None] * v


def measure(variant: str, dora: bool, steps: int) -> dict[str, Any]:
    """One round of three clients; the merge gap per matrix and bytes sent."""
    from peft.utils.integrations import dequantize_module_weight

    cfg = config(variant, dora, steps)
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
    for key in start:
        if not key.endswith(A_SUFFIX):
            continue
        name = key[: -len(A_SUFFIX)]
        layer = model.get_submodule(name)
        w = dequantize_module_weight(layer.base_layer).float()
        s = float(layer.scaling["default"])
        ideal = sum(
            wt * full_weight({**start, **o.state}, name, w, s)
            for wt, o in zip(weights, outs, strict=True)
        ) / sum(weights)
        error = (full_weight(merged, name, w, s) - ideal).norm()
        gaps.append(float(error / (ideal - w.double()).norm()))
    up = recorddict_to_proto(RecordDict({"arrays": ArrayRecord(outs[0].state)}))
    return {
        "variant": variant,
        "dora": dora,
        "local_steps": steps,
        "gap_median": statistics.median(gaps),
        "gap_max": max(gaps),
        "bytes_up_per_client": up.ByteSize(),
        "tensors_up": len(outs[0].state),
    }


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dora_merge")
    parser.add_argument("--out", type=str, default=None, help="result file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for variant in ("lora", "ffa"):
        for dora in (False, True):
            for steps in (1, 5, 20):
                row = measure(variant, dora, steps)
                print(row, flush=True)
                rows.append(row)
    out = {"clients": CLIENTS, "rank": 4, "rows": rows}
    from pathlib import Path

    write_result(
        "dora_merge",
        time.strftime("%Y%m%d-%H%M%S"),
        out,
        Path(args.out) if args.out else None,
    )


if __name__ == "__main__":
    main()
