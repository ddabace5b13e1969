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

from typing import Any

from torch import Tensor

from fedlora.adapters import StateDict
from strategies.config import ExperimentConfig
from strategies.hetero import hetlora_merge
from strategies.hetero_base import HeteroRankLora, truncate_state


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
