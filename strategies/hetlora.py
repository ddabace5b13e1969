"""HetLoRA [Cho et al., EMNLP 2024]: zero-pad, average, truncate.

Paper: "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models". Every client's factors are zero-padded to the maximum rank, averaged
factor by factor (optionally weighted by ``||B_i A_i||_F``, the paper's sparsity
weighting) and each client receives the first ``r_i`` components. Not exact: the
factor average is not the average of the products (algorithms.md §1.1, §6.1), and
the client-side rank self-pruning of the paper is not implemented.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from strategies.config import ExperimentConfig
from strategies.hetero import hetlora_merge
from strategies.hetero_base import HeteroRankLora


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

    def merge_factors(
        self,
        server_round: int,
        name: str,
        factors: list[tuple[Tensor, Tensor]],
        weights: list[float],
        ranks: list[int],
    ) -> tuple[Tensor, Tensor]:
        """Return the padded factor-wise mean at ``max_rank``."""
        del server_round, name
        scaled = [
            (self.scale(r) * b, a) for r, (b, a) in zip(ranks, factors, strict=True)
        ]
        if self.norm_weighting:
            # Frobenius norm of the actual update s_i B_i A_i, factors unscaled
            norms = [float((bs.double() @ a.double()).norm()) for bs, a in scaled]
            weights = [w * n for w, n in zip(weights, norms, strict=True)]
            if sum(weights) <= 0:  # every update is zero (e.g. round 1 with B = 0)
                weights = [1.0] * len(weights)
        b, a = hetlora_merge(factors, weights, norm_weighting=False)
        pad_b = b.new_zeros(b.shape[0], self.max_rank)
        pad_a = a.new_zeros(self.max_rank, a.shape[1])
        pad_b[:, : b.shape[1]] = b
        pad_a[: a.shape[0], :] = a
        return pad_b, pad_a
