"""What DP-SGD costs one client per adapter variant: step time and wire bytes.

Two reports per model, printed as one JSON object and written to
``benchmarks/results/dp_costs-<timestamp>.json`` (the folder is gitignored):

1. ``timing``: seconds per local step (``result.seconds / result.steps`` of
   ``fedlora.client.round.train_round``, site 0 of 8, in this process, torch threads =
   1 like a Ray actor) with ``privacy.mode=dp`` (``privacy.epsilon=3``, a fresh
   ``PrivacyLedger("rdp", 1e-5)`` per call) and with ``privacy.mode=none``, for
   rounds 1 and 2 (RoLoRA trains B in odd rounds and A in even ones). Each
   (mode, round) is warmed up once, then the repeats interleave DP and non-DP so
   load drift hits both; medians are reported with ``ratio_dp_over_none``. The
   round-2 input is the initial adapter updated with a non-DP round-1 reply. DP
   draws Poisson batches of *expected* size ``train.batch_size``, so
   ``examples_per_step`` is given for both modes (and ``ratio_per_example``,
   the ratio of median seconds per example); DP seconds exclude Opacus
   wrapping and noise calibration (outside the timed loop, as non-DP excludes
   building the optimizer).
2. ``bytes``: serialised bytes per client per round each way, as Flower encodes
   them: ``recorddict_to_proto(RecordDict({"arrays": ArrayRecord(...)})).ByteSize()``
   of what the server sends down (``select(state, variant.sends_down(round))``:
   the factors plus the task head) and of what ``train_round`` returns (up), with
   the raw float32 size and the ratio to ``lora``.

Commands (from the repository root; one benchmark at a time, it uses one core)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m benchmarks.dp_costs            # ~3-5 min
    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m benchmarks.dp_costs --models minilm \\
        --variants lora ffa --repeats 1                                       # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from torch import Tensor

from benchmarks.output import write_result
from benchmarks.round_costs import _rounded

VARIANT_NAMES = ("lora", "ffa", "la_lora", "rolora")
ROUNDS = (1, 2)
MODES = ("none", "dp")
EPSILON = 3.0
# Base models: label -> config values (data: the synthetic classification default).
MODELS: dict[str, dict[str, Any]] = {
    "minilm": {"model.name": "minilm"},
    "tiny_llama-256": {"model.name": "tiny_llama", "model.tiny_hidden_size": 256},
}


def make_config(model: Mapping[str, Any], variant: str, mode: str, steps: int) -> Any:
    """ExperimentConfig: NF4 ``model``, synthetic data, ``variant``, DP or not."""
    from fedlora.config.flat import build_config
    from strategies.config import ExperimentConfig

    values: dict[str, Any] = {
        **model,
        "model.quantization": "nf4",
        "data.source": "synthetic",
        "adapter.variant": variant,
        "federation.local_steps": steps,
        "privacy.mode": mode,
    }
    if mode == "dp":
        values["privacy.epsilon"] = EPSILON
    return build_config(ExperimentConfig, values)


def wire_bytes(state: Mapping[str, Tensor]) -> int:
    """Bytes of ``state`` as Flower serialises a message's ``arrays`` record."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedlora.lora.state import to_record

    return int(recorddict_to_proto(RecordDict({"arrays": to_record(state)})).ByteSize())


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def variant_costs(
    model: Mapping[str, Any], variant: str, steps: int, repeats: int
) -> dict[str, Any]:
    """Timing (DP vs none, rounds 1 and 2) and wire bytes of one variant."""
    from fedlora.cache import model_bundle
    from fedlora.client.round import RoundOutcome, train_round
    from fedlora.client.site import SiteConfig
    from fedlora.dp import PrivacyLedger
    from fedlora.lora.state import adapter_state, num_params, select
    from fedlora.lora.variants import VARIANTS

    site = SiteConfig(0, 8)
    cfgs = {m: make_config(model, variant, m, steps) for m in MODES}
    spec = VARIANTS.get(variant)
    initial = adapter_state(model_bundle(cfgs["none"]).model)

    def run(mode: str, rnd: int, state: Mapping[str, Tensor]) -> RoundOutcome:
        ledger = PrivacyLedger("rdp", 1e-5) if mode == "dp" else None
        return train_round(cfgs[mode], site, rnd, state, ledger=ledger)

    # Round 2 starts from the adapter after a (non-DP) round 1, as in a federation.
    down = {1: select(initial, spec.sends_down(1))}
    warm: dict[tuple[str, int], RoundOutcome] = {}
    for mode in MODES:
        warm[mode, 1] = run(mode, 1, down[1])
    down[2] = select({**initial, **warm["none", 1].state}, spec.sends_down(2))
    for mode in MODES:
        warm[mode, 2] = run(mode, 2, down[2])
    per_step: dict[tuple[str, int], list[float]] = {k: [] for k in warm}
    examples: dict[tuple[str, int], list[float]] = {k: [] for k in warm}
    for _ in range(repeats):
        for rnd in ROUNDS:
            for mode in MODES:
                out = run(mode, rnd, down[rnd])
                per_step[mode, rnd].append(out.result.seconds / out.result.steps)
                examples[mode, rnd].append(out.result.examples / out.result.steps)
    timing: dict[str, Any] = {}
    wire: dict[str, Any] = {}
    for rnd in ROUNDS:
        sec = {m: _median(per_step[m, rnd]) for m in MODES}
        ex = {m: _median(examples[m, rnd]) for m in MODES}
        timing[f"round{rnd}"] = {
            "seconds_per_step": sec,
            "ratio_dp_over_none": sec["dp"] / sec["none"],
            "examples_per_step": ex,  # DP: Poisson, expected train.batch_size
            "ratio_per_example": (sec["dp"] / ex["dp"]) / (sec["none"] / ex["none"]),
            "repeats_seconds_per_step": {m: per_step[m, rnd] for m in MODES},
        }
        up, up_dp = warm["none", rnd].state, warm["dp", rnd].state
        wire[f"round{rnd}"] = {
            "down": wire_bytes(down[rnd]),
            "up": wire_bytes(up),
            "down_raw_float32": 4 * num_params(down[rnd]),
            "up_raw_float32": 4 * num_params(up),
            "tensors_down": len(down[rnd]),
            "tensors_up": len(up),
            "dp_up_keys_match": sorted(up) == sorted(up_dp),
        }
    privacy = warm["dp", 1].privacy
    return {
        "timing": timing,
        "bytes": wire,
        "dp": None
        if privacy is None
        else {
            "noise_multiplier": privacy.noise_multiplier,
            "sample_rate": privacy.sample_rate,
            "epsilon_after_one_round": privacy.epsilon,
        },
        "num_examples": warm["none", 1].num_examples,
    }


def model_report(
    label: str, variants: Sequence[str], steps: int, repeats: int
) -> dict[str, Any]:
    """Every variant's costs plus side-by-side DP ratios and byte ratios to lora."""
    model = MODELS[label]
    per_variant: dict[str, Any] = {}
    for variant in variants:
        start = time.perf_counter()
        per_variant[variant] = variant_costs(model, variant, steps, repeats)
        took = time.perf_counter() - start
        print(f"[dp_costs] {label} {variant}: {took:.0f}s", file=sys.stderr)
    ratios = {
        v: {r: c["timing"][r]["ratio_dp_over_none"] for r in c["timing"]}
        for v, c in per_variant.items()
    }
    seconds = {
        v: {r: c["timing"][r]["seconds_per_step"] for r in c["timing"]}
        for v, c in per_variant.items()
    }
    wire = {
        v: {r: {d: c["bytes"][r][d] for d in ("down", "up")} for r in c["bytes"]}
        for v, c in per_variant.items()
    }
    to_lora = None
    if "lora" in wire:
        base = wire["lora"]
        to_lora = {
            v: {r: {d: b[r][d] / base[r][d] for d in b[r]} for r in b}
            for v, b in wire.items()
        }
    return {
        "config": dict(model),
        "dp_ratio_side_by_side": ratios,
        "seconds_per_step_side_by_side": seconds,
        "bytes_side_by_side": wire,
        "bytes_ratio_to_lora": to_lora,
        "variants": per_variant,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--models", nargs="*", choices=list(MODELS), default=list(MODELS)
    )
    parser.add_argument(
        "--variants", nargs="*", choices=VARIANT_NAMES, default=list(VARIANT_NAMES)
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats")
    parser.add_argument("--steps", type=int, default=10, help="local steps a round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--output", type=Path, help="JSON file (default: results/)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both reports for the selected models; print and save them as JSON."""
    import torch

    args = _parse(argv)
    torch.set_num_threads(args.threads)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    out: dict[str, Any] = {
        "host_at_start": {"cores": os.cpu_count(), "loadavg": os.getloadavg()},
        "torch_threads": torch.get_num_threads(),
        "site": "partition 0 of 8",
        "local_steps": args.steps,
        "repeats": args.repeats,
        "privacy": {"epsilon": EPSILON, "delta": 1e-5, "accountant": "rdp"},
        "models": _rounded(
            {
                label: model_report(label, args.variants, args.steps, args.repeats)
                for label in args.models
            }
        ),
    }
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["host_at_end"] = {"loadavg": os.getloadavg()}
    write_result("dp_costs", stamp, out, args.output)
    return out


if __name__ == "__main__":
    main()
