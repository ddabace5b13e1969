"""Column sensitivity, nested negotiation and column swapping (pure math).

A LoRA update ``dW = s B A`` has ``d_in`` input columns; column ``j`` of ``dW`` is
``s B A[:, j]``, the part of the update that multiplies input feature ``j``. SHE-LoRA
encrypts the columns whose input features carry the most energy on the client's data
(the DAGER span attack reads the input span through them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def column_scores(a: Tensor, input_norms: Tensor) -> Tensor:
    """Per-column sensitivity ``score_j = sum_rho |A[rho, j]| * ||X_j||_2``.

    The paper's form (sum of absolute values; the official code takes the absolute
    value of the sum, which cancels mixed-sign rows). ``a``: ``(r, d_in)``;
    ``input_norms``: ``(d_in,)`` L2 norm of input feature ``j`` over the calibration
    tokens. Returns float64 ``(d_in,)``.
    """
    if a.shape[1] != input_norms.numel():
        raise ValueError(
            f"A has {a.shape[1]} input columns but {input_norms.numel()} input norms"
        )
    return adapter_column_scores(a) * input_norms.double().flatten()


def adapter_column_scores(a: Tensor) -> Tensor:
    """Data-free sensitivity ``score_j = sum_rho |A[rho, j]|``.

    :func:`column_scores` with every input norm ``||X_j||_2`` set to one, i.e. the
    paper's score under an isotropic input prior. ``|A[:, j]|`` bounds the column
    ``s B A[:, j]`` of the update (``||s B A[:, j]|| <= s ||B||_2 ||A[:, j]||``),
    so it still ranks the columns through which the adapter moves the most, and it
    reads nothing but ``A``. ``a``: ``(r, d_in)``. Returns float64 ``(d_in,)``.
    """
    return a.double().abs().sum(dim=0)


def top_columns(scores: Tensor, k: int) -> list[int]:
    """Return the ``k`` best column positions, best first (ties: lower index)."""
    k = min(k, scores.numel())
    order = sorted(range(scores.numel()), key=lambda j: (-float(scores[j]), j))
    return order[:k]


@dataclass(frozen=True)
class Selection:
    """One client's choice for one matrix: its budget and its best columns."""

    budget: int
    positions: Sequence[int]  # best first, len >= budget
    scores: Sequence[float]  # score of each position


def negotiate(selections: Sequence[Selection], d_in: int) -> list[int]:
    """One ordered column list for a matrix, nested across budgets.

    Budgets are served in increasing order; for budget level ``L`` the candidates
    are the first ``L`` choices of every client whose budget is at least ``L``,
    ranked by how many of them chose the column, then by its highest score, then
    by position. The list grows to ``L`` from those candidates (then from the
    globally most sensitive columns), so a client with budget ``k`` encrypts
    exactly the first ``k`` entries and every client's list is a prefix of the
    others'. Deterministic; replaces the paper's Gaussian-process search over
    mixing weights, which needs skopt and changes nothing structural.
    """
    if not selections:
        return []
    best: dict[int, float] = {}
    for sel in selections:
        for p, s in zip(sel.positions, sel.scores, strict=True):
            if not 0 <= p < d_in:
                raise ValueError(f"column position {p} outside [0, {d_in})")
            best[p] = max(best.get(p, float("-inf")), float(s))
    result: list[int] = []
    for level in sorted({min(sel.budget, d_in) for sel in selections}):
        votes: dict[int, int] = {}
        for sel in selections:
            if sel.budget >= level:
                for p in sel.positions[:level]:
                    votes[p] = votes.get(p, 0) + 1
        ranked = sorted(votes, key=lambda p: (-votes[p], -best[p], p))
        fallback = sorted(range(d_in), key=lambda p: (-best.get(p, -1.0), p))
        for p in [*ranked, *fallback]:
            if len(result) >= level:
                break
            if p not in result:
                result.append(p)
    return result


def swap_permutation(n: int, cols: Sequence[int]) -> list[int]:
    """Source index of each position after moving ``cols`` to the tail.

    Selected column ``cols[l]`` lands on position ``n - 1 - l``; the unselected
    columns that sat in the tail move into the vacated positions, in order; every
    other column stays. A permutation, so the swap is exactly invertible even when
    a selected column already lies in the tail.
    """
    k = len(cols)
    if len(set(cols)) != k or any(not 0 <= c < n for c in cols) or k > n:
        raise ValueError(f"columns {list(cols)} must be distinct and in [0, {n})")
    tail = [n - 1 - ell for ell in range(k)]
    src = list(range(n))
    for ell, c in enumerate(cols):
        src[tail[ell]] = c
    vacated = [c for c in cols if c not in tail]
    displaced = [t for t in tail if t not in cols]
    for v, d in zip(vacated, displaced, strict=True):
        src[v] = d
    return src


def swap_columns(a: Tensor, cols: Sequence[int]) -> Tensor:
    """Move ``cols`` of ``A`` to its last ``len(cols)`` columns (see above)."""
    return a[:, swap_permutation(a.shape[1], cols)].clone()


def unswap_columns(a_swapped: Tensor, cols: Sequence[int]) -> Tensor:
    """Inverse of :func:`swap_columns` for the same ``cols``."""
    src = swap_permutation(a_swapped.shape[1], cols)
    out = torch.empty_like(a_swapped)
    out[:, src] = a_swapped
    return out
