"""SHE-LoRA's encryption cost vs encrypting the whole adapter, at the same packing.

For one client and one round: the ciphertext bytes and the encryption time of
(a) the selective scheme (``k`` columns of every adapted matrix's update, ``m``
values each, packed 4096 per ciphertext: ``fedlora.she.packing``) and (b) full
encryption of the same adapter (every value of every A and B, packed the same
way), plus the ratios (b is the paper's "full HE" baseline; it reports
-99.71% bytes and -99.87% encryption time at a 0.125% column budget).

Shapes: ``minilm`` is the default model's adapter (query/value of 6 layers,
384 x 384, rank 8); ``llama7b_qv`` is LLaMA-7B's q/v projections (32 layers,
4096 x 4096, rank 8), where 0.125% of the columns is 5 per matrix. Values are
random (encryption cost does not depend on them). CKKS: N = 8192, [60, 60],
scale 2^40, no Galois keys (``fedlora.she.keys``). Timings are medians of
``--repeats`` runs on one thread.

Command (from the repository root)::

    PYTHONPATH=. python -m benchmarks.she_costs                 # ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.output import write_result
from fedlora.she.keys import SLOTS, new_context
from fedlora.she.packing import encrypt_columns

SHAPES = {
    # name: (number of adapted matrices, d_out, d_in, rank)
    "minilm": (12, 384, 384, 8),
    "llama7b_qv": (64, 4096, 4096, 8),
}


def _encrypt_flat(ctx: Any, n_values: int) -> tuple[int, float]:
    """Encrypt ``n_values`` random floats packed SLOTS per ciphertext."""
    import tenseal as ts

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    size = 0
    for off in range(0, n_values, SLOTS):
        chunk = rng.normal(0, 0.02, min(SLOTS, n_values - off))
        part = np.zeros(SLOTS)
        part[: chunk.size] = chunk
        size += len(ts.ckks_vector(ctx, part.tolist()).serialize())
    return size, time.perf_counter() - start


def _selective(ctx: Any, mats: int, d_out: int, k: int) -> tuple[int, float]:
    g = torch.Generator().manual_seed(0)
    cols = {f"m{i:03d}": torch.randn(d_out, k, generator=g) for i in range(mats)}
    start = time.perf_counter()
    chunks = encrypt_columns(ctx, cols)
    return sum(len(c) for c in chunks), time.perf_counter() - start


def measure(name: str, budgets: list[int], repeats: int) -> dict[str, Any]:
    """Full vs selective encryption for one adapter shape."""
    mats, d_out, d_in, rank = SHAPES[name]
    ctx = new_context()
    adapter_values = mats * rank * (d_out + d_in)
    full = [_encrypt_flat(ctx, adapter_values) for _ in range(repeats)]
    full_bytes, full_s = full[0][0], statistics.median(t for _, t in full)
    out: dict[str, Any] = {
        "matrices": mats,
        "d_out": d_out,
        "d_in": d_in,
        "rank": rank,
        "adapter_values": adapter_values,
        "adapter_bytes_float32": adapter_values * 4,
        "full": {
            "ciphertexts": math.ceil(adapter_values / SLOTS),
            "bytes": full_bytes,
            "encrypt_seconds": full_s,
        },
        "selective": [],
    }
    for k in budgets:
        runs = [_selective(ctx, mats, d_out, k) for _ in range(repeats)]
        sel_bytes, sel_s = runs[0][0], statistics.median(t for _, t in runs)
        out["selective"].append(
            {
                "columns_per_matrix": k,
                "column_fraction": k / d_in,
                "ciphertexts": math.ceil(k * mats * d_out / SLOTS),
                "bytes": sel_bytes,
                "encrypt_seconds": sel_s,
                "bytes_ratio_vs_full": sel_bytes / full_bytes,
                "time_ratio_vs_full": sel_s / full_s,
                "bytes_ratio_vs_plain_adapter": sel_bytes / (adapter_values * 4),
            }
        )
    return out


def main() -> None:
    """CLI."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = {
        # minilm: 1 column = 0.26% (0.125% is below one column), 4 = default
        "minilm": measure("minilm", [1, 4], args.repeats),
        # 7B: 5 of 4096 columns = 0.122%, i.e. the paper's 0.125% budget
        "llama7b_qv": measure("llama7b_qv", [4, 5], max(1, args.repeats - 2)),
    }
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    write_result("she_costs", stamp, result, args.out)


if __name__ == "__main__":
    main()
