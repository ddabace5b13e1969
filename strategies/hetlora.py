"""HetLoRA [Cho et al., EMNLP 2024]: zero-pad, average, truncate.

Paper: "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models". Every client's factors are zero-padded to the maximum rank, averaged
factor by factor (optionally weighted by ``||s_i B_i A_i||_F``, the paper's
sparsity weighting) and each client receives the first ``r_i`` components. The
LoRA scale ``s_i = alpha / r_i`` differs by rank, so ``B_i`` is rescaled by
``s_i / s_max`` when padded and by ``s_max / s_i`` when truncated: the global
adapter (scale ``s_max``) holds each client's update at its true size. Not exact:
the factor average is not the average of the products, and truncation drops
components. The client-side rank self-pruning of the paper is not implemented.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedlora.lora.rank import Factors, check_pairs, pad_rank
from fedlora.lora.state import StateDict
from strategies.aggregation import normalise_weights
from strategies.config import ExperimentConfig
from strategies.exceptions import AggregationError
from strategies.rank_aware import HeteroRankLora, truncate_state


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
    if len(factors) != len(weights):
        raise AggregationError(f"{len(factors)} clients but {len(weights)} weights")
    d_out, d_in = check_pairs(factors)
    above = [b.shape[1] for b, _ in factors if b.shape[1] > r_max]
    if above:
        raise AggregationError(f"ranks {above} exceed the maximum rank {r_max}")
    if norm_weighting:
        norms = [
            s * float(torch.linalg.matrix_norm(b.double() @ a.double()))
            for s, (b, a) in zip(scales, factors, strict=True)
        ]
        weights = [w * n for w, n in zip(weights, norms, strict=True)]
        if sum(weights) <= 0:
            weights = [1.0] * len(factors)
    p = normalise_weights(weights)
    b_sum = torch.zeros(d_out, r_max, dtype=torch.float64)
    a_sum = torch.zeros(r_max, d_in, dtype=torch.float64)
    for pi, si, (b, a) in zip(p, scales, factors, strict=True):
        b_pad, a_pad = pad_rank(b.double() * (si / s_max), a.double(), r_max)
        b_sum += pi * b_pad
        a_sum += pi * a_pad
    return b_sum, a_sum


class HetLora(HeteroRankLora):
    """Zero-padding aggregation of heterogeneous ranks.

    Parameters (besides HeteroRankLora's)
    ----------
    norm_weighting : bool (default: True)
        Multiply each client's weight by ``||s_i B_i A_i||_F`` (HetLoRA).
    """

    def __init__(self, *, norm_weighting: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.norm_weighting = norm_weighting

    @classmethod
    def extra_kwargs(cls, cfg: ExperimentConfig) -> dict[str, Any]:
        """``strategy.norm_weighting``."""
        return {"norm_weighting": cfg.strategy.norm_weighting}

    def client_state(self, server_round: int, node: int) -> StateDict:
        """First ``r_i`` components with ``B`` rescaled by ``s_max / s_i``.

        The node applies its own scale ``s_i``, so ``s_i B_i A_i`` equals the
        global ``s_max B A`` restricted to the first ``r_i`` components.
        """
        del server_round
        rank = self.nodes[node].rank
        factor = self.scale(self.max_rank) / self.scale(rank)
        return truncate_state(self._global(), rank, b_factor=factor)

    def merge_factors(
        self,
        server_round: int,
        name: str,
        factors: list[tuple[Tensor, Tensor]],
        weights: list[float],
        ranks: list[int],
    ) -> tuple[Tensor, Tensor]:
        """Return the padded, rescaled factor-wise mean at ``max_rank``."""
        del server_round, name
        return hetlora_merge(
            factors,
            weights,
            [self.scale(r) for r in ranks],
            r_max=self.max_rank,
            s_max=self.scale(self.max_rank),
            norm_weighting=self.norm_weighting,
        )
