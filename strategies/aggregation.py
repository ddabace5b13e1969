"""Pure aggregation functions over adapter dicts (no Flower import).

Every function takes client adapter dicts ``{key: Tensor}`` and weights, returns a
new dict, never mutates its inputs, and accumulates in float64 before casting back
to the input dtype, so the result is the exact weighted mean up to one rounding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from strategies.exceptions import AggregationError

StateDict = dict[str, Tensor]


def normalise_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to one; all must be finite and >= 0, sum > 0."""
    if not weights:
        raise AggregationError("No weights given: nothing to aggregate")
    if any(not (w >= 0 and w < float("inf")) for w in weights):
        raise AggregationError(f"Weights must be finite and >= 0, got {list(weights)}")
    total = float(sum(weights))
    if total <= 0:
        raise AggregationError(f"Weights sum to {total}; need a positive sum")
    return [float(w) / total for w in weights]


def weighted_mean(
    states: Sequence[Mapping[str, Tensor]], weights: Sequence[float]
) -> StateDict:
    """Per-key weighted mean ``sum_i p_i X_i`` with ``p_i = w_i / sum_j w_j``.

    Parameters
    ----------
    states : Sequence[Mapping[str, Tensor]]
        One adapter dict per client; all must have the same keys and shapes.
    weights : Sequence[float]
        One non-negative weight per client (e.g. its number of examples).

    Returns
    -------
    dict[str, Tensor]
        Same keys, shapes and dtypes as the inputs.

    Notes
    -----
    Applied to LoRA factors this averages A and B *separately*; the product of
    the means is not the mean of the products ``B_i A_i`` unless the factors agree
    across clients (see ``product_mean`` for the exact update).
    """
    if len(states) != len(weights):
        raise AggregationError(
            f"{len(states)} client states but {len(weights)} weights"
        )
    p = normalise_weights(weights)
    keys = set(states[0])
    for i, s in enumerate(states[1:], start=1):
        if set(s) != keys:
            diff = sorted(keys.symmetric_difference(s))[:5]
            raise AggregationError(f"Client {i} has different keys: {diff}")
    out: StateDict = {}
    for key in states[0]:
        ref = states[0][key]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for pi, s in zip(p, states, strict=True):
            if s[key].shape != ref.shape:
                raise AggregationError(
                    f"{key}: shape {tuple(s[key].shape)} != {tuple(ref.shape)}"
                )
            acc += pi * s[key].detach().to("cpu", torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def product_mean(
    factors: Sequence[tuple[Tensor, Tensor]], weights: Sequence[float]
) -> Tensor:
    """Exact mean of the updates ``sum_i p_i B_i A_i`` for one adapted matrix.

    ``factors[i] = (B_i, A_i)`` with ``B_i: (d_out, r_i)``, ``A_i: (r_i, d_in)``;
    ranks may differ. Returns a float64 ``(d_out, d_in)`` matrix.
    """
    p = normalise_weights(weights)
    b0, a0 = factors[0]
    out = torch.zeros(b0.shape[0], a0.shape[1], dtype=torch.float64)
    for pi, (b, a) in zip(p, factors, strict=True):
        out += pi * (b.double() @ a.double())
    return out


def merge_into(
    global_state: Mapping[str, Tensor], update: Mapping[str, Tensor]
) -> StateDict:
    """Return a new global dict: ``update`` replaces its keys, the rest is kept."""
    unknown = sorted(set(update) - set(global_state))
    if unknown:
        raise AggregationError(
            f"Update has keys the global adapter lacks: {unknown[:5]}"
        )
    return {
        k: (update[k] if k in update else v).clone() for k, v in global_state.items()
    }
