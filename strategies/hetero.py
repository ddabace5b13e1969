"""Heterogeneous-rank LoRA aggregation: pure math for one adapted matrix.

Client ``i`` holds ``B_i: (d_out, r_i)`` and ``A_i: (r_i, d_in)`` with LoRA scale
``s_i`` (alpha / r_i, or alpha / sqrt(r_i) with rsLoRA), so its update is
``dW_i = s_i B_i A_i``. Three ways to merge clients of different ranks:

* HetLoRA [Cho et al., EMNLP 2024]: zero-pad every client to ``r_max``, average the
  factors (optionally weighted by ``||s_i B_i A_i||_F``), truncate to each client's
  rank. ``B_i`` is rescaled by ``s_i / s_max`` before padding and by ``s_max / s_i``
  on truncation, so a padded client contributes exactly its own update.
  Not exact: the mean of factors is not the mean of products, and truncation.
* FLoRA [Wang et al., NeurIPS 2024]: stack ``[B_1 | ... | B_K]`` and
  ``[p_1 s_1 A_1; ...; p_K s_K A_K]``; the stacked product is exactly
  ``sum_i p_i dW_i``.
* FlexLoRA [Bai et al., NeurIPS 2024]: form ``sum_i p_i dW_i`` and give each client
  its best rank-``r_i`` approximation by SVD (Eckart-Young).

Every function accumulates in float64 and never mutates its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.lowrank import svd_factors
from strategies.aggregation import normalise_weights
from strategies.exceptions import AggregationError

Factors = tuple[Tensor, Tensor]  # (B: (d_out, r), A: (r, d_in))


def _check(factors: Sequence[Factors], weights: Sequence[float]) -> list[float]:
    if len(factors) != len(weights):
        raise AggregationError(f"{len(factors)} clients but {len(weights)} weights")
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    for i, (b, a) in enumerate(factors):
        if b.shape[1] != a.shape[0] or b.shape[0] != d_out or a.shape[1] != d_in:
            raise AggregationError(
                f"client {i}: B {tuple(b.shape)} and A {tuple(a.shape)} do not form a "
                f"({d_out}, {d_in}) update"
            )
    return normalise_weights(weights)


def pad_rank(b: Tensor, a: Tensor, r_max: int) -> Factors:
    """Zero-pad ``B`` on columns and ``A`` on rows to rank ``r_max`` (product kept)."""
    r = b.shape[1]
    if r > r_max:
        raise AggregationError(f"rank {r} exceeds the maximum rank {r_max}")
    b_pad = torch.zeros(b.shape[0], r_max, dtype=b.dtype)
    a_pad = torch.zeros(r_max, a.shape[1], dtype=a.dtype)
    b_pad[:, :r] = b
    a_pad[:r, :] = a
    return b_pad, a_pad


def hetlora_merge(
    factors: Sequence[Factors],
    weights: Sequence[float],
    scales: Sequence[float],
    *,
    r_max: int,
    s_max: float,
    norm_weighting: bool,
) -> Factors:
    """HetLoRA: factor-wise weighted mean of the zero-padded clients at ``r_max``.

    Client ``i`` (scale ``s_i``) enters as ``(B_i s_i / s_max, A_i)`` zero-padded to
    ``r_max``, so under the global scale ``s_max`` its padded factors give exactly
    its own update ``s_i B_i A_i``: a client merged alone is returned unchanged.
    With ``norm_weighting`` the weights are ``w_i ||s_i B_i A_i||_F`` (HetLoRA's
    sparsity weighting; uniform when every update is zero, e.g. while B = 0);
    otherwise ``w_i``. Returns float64 ``B: (d_out, r_max)``, ``A: (r_max, d_in)``.
    """
    if norm_weighting:
        norms = [
            s * float(torch.linalg.matrix_norm(b.double() @ a.double()))
            for s, (b, a) in zip(scales, factors, strict=True)
        ]
        weights = [w * n for w, n in zip(weights, norms, strict=True)]
        if sum(weights) <= 0:
            weights = [1.0] * len(factors)
    p = _check(factors, weights)
    b_sum = torch.zeros(factors[0][0].shape[0], r_max, dtype=torch.float64)
    a_sum = torch.zeros(r_max, factors[0][1].shape[1], dtype=torch.float64)
    for pi, si, (b, a) in zip(p, scales, factors, strict=True):
        b_pad, a_pad = pad_rank(b.double() * (si / s_max), a.double(), r_max)
        b_sum += pi * b_pad
        a_sum += pi * a_pad
    return b_sum, a_sum


def flora_stack(
    factors: Sequence[Factors], weights: Sequence[float], scales: Sequence[float]
) -> Factors:
    """FLoRA stacking: ``B_stack A_stack = sum_i p_i s_i B_i A_i`` exactly.

    Returns float64 ``B_stack: (d_out, sum r_i)`` and ``A_stack: (sum r_i, d_in)``
    with the weights and scales folded into A (so the stack's own scale is 1).
    """
    p = _check(factors, weights)
    b_stack = torch.cat([b.double() for b, _ in factors], dim=1)
    a_stack = torch.cat(
        [
            pi * si * a.double()
            for pi, si, (_, a) in zip(p, scales, factors, strict=True)
        ],
        dim=0,
    )
    return b_stack, a_stack


def mean_update(
    factors: Sequence[Factors], weights: Sequence[float], scales: Sequence[float]
) -> Tensor:
    """``sum_i p_i s_i B_i A_i`` as a float64 ``(d_out, d_in)`` matrix."""
    b_stack, a_stack = flora_stack(factors, weights, scales)
    return b_stack @ a_stack


def flexlora_redistribute(
    delta: Tensor, ranks: Sequence[int], scales: Sequence[float]
) -> list[Factors]:
    """FlexLoRA: each client's best rank-``r_i`` factors (one SVD for all)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return [svd_factors(u, s, vh, r, sc) for r, sc in zip(ranks, scales, strict=True)]
