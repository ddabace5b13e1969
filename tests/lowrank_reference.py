"""Independent float64 references for the low-rank merges (written out, no library).

Tests compare production's aggregation with these, never with itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def mean_update(
    factors: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float],
    scales: Sequence[float],
) -> Tensor:
    """``sum_i w_i s_i B_i A_i / sum_i w_i`` in float64, one product at a time."""
    total = float(sum(weights))
    out = torch.zeros(
        factors[0][0].shape[0], factors[0][1].shape[1], dtype=torch.float64
    )
    for w, s, (b, a) in zip(weights, scales, factors, strict=True):
        out += (w / total) * s * (b.double() @ a.double())
    return out
