"""All low-rank math on LoRA factors, shared by clients and the server.

A client of rank ``r`` and LoRA scale ``s`` (``alpha / r``, or ``alpha / sqrt(r)``
with rsLoRA) represents an update ``dW = s B A`` with ``B: (d_out, r)`` and
``A: (r, d_in)``. Scales differ between ranks, so every change of rank must carry
the scale with it (a rank-4 client at alpha 16 weighs its update 4x more than a
rank-16 one). This module holds:

* the scale itself (:func:`lora_scale`);
* changing the rank of a pair: zero-padding (:func:`pad_rank`, product kept) and
  truncation (:func:`truncate_rank`, the first components);
* combining clients: stacking (:func:`stack_factors`, exact) and the weighted mean
  of the products (:func:`product_mean`);
* back to factors: :func:`svd_factors` / :func:`best_rank_factors` make ``s B A``
  the best rank-``r`` approximation of ``dW`` (Eckart-Young), with the singular
  values split evenly between B and A.

Weights given here are already normalised (``p_i >= 0``, summing to one; the
strategies normalise and validate them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (B: (d_out, r), A: (r, d_in))


def check_pairs(factors: Sequence[Factors]) -> tuple[int, int]:
    """Check that every ``(B_i, A_i)`` forms a ``(d_out, d_in)`` update; return it.

    Ranks may differ between clients; ``B_i``'s columns must match ``A_i``'s rows.
    """
    if not factors:
        raise ValueError("no factor pairs given")
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    for i, (b, a) in enumerate(factors):
        if b.shape[1] != a.shape[0] or b.shape[0] != d_out or a.shape[1] != d_in:
            raise ValueError(
                f"client {i}: B {tuple(b.shape)} and A {tuple(a.shape)} do not form a "
                f"({d_out}, {d_in}) update"
            )
    return d_out, d_in


def pad_rank(b: Tensor, a: Tensor, r_max: int) -> Factors:
    """Zero-pad ``B`` on columns and ``A`` on rows to rank ``r_max``.

    The product ``B A`` is unchanged (the scale is the caller's: multiply ``B`` by
    ``s / s_new`` first to keep ``s B A`` under the new rank's scale). Returns
    ``B: (d_out, r_max)``, ``A: (r_max, d_in)`` in the inputs' dtypes.
    """
    r = b.shape[1]
    if r > r_max:
        raise ValueError(f"rank {r} exceeds the maximum rank {r_max}")
    b_pad = torch.zeros(b.shape[0], r_max, dtype=b.dtype)
    a_pad = torch.zeros(r_max, a.shape[1], dtype=a.dtype)
    b_pad[:, :r] = b
    a_pad[:r, :] = a
    return b_pad, a_pad


def truncate_rank(b: Tensor, a: Tensor, r: int, *, b_factor: float = 1.0) -> Factors:
    """Keep the first ``r`` components: ``B[:, :r] * b_factor``, ``A[:r, :]`` (copies).

    ``b_factor`` carries a change of scale (``s_old / s_new``, e.g. HetLoRA's
    ``s_max / s_i``), so the kept components give the same update at the new rank.
    """
    b_out = b[:, :r] * b_factor if b_factor != 1.0 else b[:, :r].clone()
    return b_out, a[:r, :].clone()


def stack_factors(
    factors: Sequence[Factors], p: Sequence[float], scales: Sequence[float]
) -> Factors:
    """Stack clients so that ``B_stack A_stack = sum_i p_i s_i B_i A_i`` exactly.

    ``B_stack = [B_1 | ... | B_K]: (d_out, sum r_i)`` and
    ``A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]: (sum r_i, d_in)``, float64, with the
    weights and scales folded into A (the stack's own scale is 1).
    """
    check_pairs(factors)
    b_stack = torch.cat([b.double() for b, _ in factors], dim=1)
    a_stack = torch.cat(
        [
            pi * si * a.double()
            for pi, si, (_, a) in zip(p, scales, factors, strict=True)
        ],
        dim=0,
    )
    return b_stack, a_stack


def product_mean(
    factors: Sequence[Factors], p: Sequence[float], scales: Sequence[float]
) -> Tensor:
    """``sum_i p_i s_i B_i A_i`` as a float64 ``(d_out, d_in)`` matrix (exact)."""
    b_stack, a_stack = stack_factors(factors, p, scales)
    return b_stack @ a_stack


def svd_factors(u: Tensor, s: Tensor, vh: Tensor, r: int, scale: float) -> Factors:
    """Rank-``r`` factors of ``U diag(s) V^T`` for LoRA scale ``scale`` (float64).

    ``B = U_r sqrt(S_r / scale)``, ``A = sqrt(S_r / scale) V_r^T`` so that
    ``scale B A`` is the truncated SVD; ranks above ``len(s)`` get zero columns.
    """
    if scale <= 0:
        raise ValueError(f"LoRA scale must be positive, got {scale}")
    k = min(r, s.numel())
    root = (s[:k] / scale).sqrt()
    b = torch.zeros(u.shape[0], r, dtype=torch.float64)
    a = torch.zeros(r, vh.shape[1], dtype=torch.float64)
    b[:, :k] = u[:, :k] * root
    a[:k, :] = root[:, None] * vh[:k]
    return b, a


def best_rank_factors(delta: Tensor, r: int, scale: float) -> Factors:
    """Factors of the best rank-``r`` approximation of ``delta`` for scale ``s``.

    ``s B A`` is the truncated SVD of ``delta`` (Eckart-Young); the singular values
    are split evenly, ``B = U sqrt(S/s)``, ``A = sqrt(S/s) V^T``. Ranks above
    ``rank(delta)`` get zero columns.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return svd_factors(u, s, vh, r, scale)


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's LoRA scale for ``rank``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank
