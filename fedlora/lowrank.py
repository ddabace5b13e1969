"""Low-rank factors from an SVD for a given LoRA scale (server and clients use it).

A client of rank ``r`` and LoRA scale ``s`` (alpha / r, P10) represents an update
``dW`` by ``s B A``; the factors below make ``s B A`` the best rank-``r``
approximation of ``dW`` (Eckart-Young), with the singular values split evenly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Factors = tuple[Tensor, Tensor]  # (B: (d_out, r), A: (r, d_in))


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
