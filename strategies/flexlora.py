"""FlexLoRA [Bai et al., NeurIPS 2024]: average the products, SVD per client rank.

Paper: "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources". The server forms ``dW = sum_i p_i s_i B_i A_i`` (exact, float64)
for every adapted matrix and gives client ``i`` the best rank-``r_i`` approximation
of ``dW`` (Eckart-Young), expressed in factors for the client's own LoRA scale
``s_i`` (so its local adapter reproduces that approximation). One SVD per matrix
per round serves every rank: the top ``r`` singular triplets are nested.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fedlora.lora.rank import product_mean, svd_factors
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, StateDict
from strategies.aggregation import normalise_weights
from strategies.rank_aware import HeteroRankLora, truncate_state

Svd = tuple[Tensor, Tensor, Tensor]


class FlexLora(HeteroRankLora):
    """Product-level averaging with per-client SVD redistribution."""

    checkpoint_attrs = ("svd",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.svd: dict[str, Svd] = {}  # matrix -> SVD of the latest dW

    def merge_factors(
        self,
        server_round: int,
        name: str,
        factors: list[tuple[Tensor, Tensor]],
        weights: list[float],
        ranks: list[int],
    ) -> tuple[Tensor, Tensor]:
        """Exact mean of the products; global factors = best rank-``max_rank``."""
        del server_round
        import torch

        scales = [self.scale(r) for r in ranks]
        delta = product_mean(factors, normalise_weights(weights), scales)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        self.svd[name] = (u, s, vh)
        return svd_factors(u, s, vh, self.max_rank, self.scale(self.max_rank))

    def client_state(self, server_round: int, node: int) -> StateDict:
        """Best rank-``r_i`` factors of every merged update for the node's scale."""
        rank = self.nodes[node].rank
        state = truncate_state(self._global(), rank)
        if not self.svd:  # round 1: the shared initialisation, truncated
            return state
        for name, (u, s, vh) in self.svd.items():
            b, a = svd_factors(u, s, vh, rank, self.scale(rank))
            state[name + B_SUFFIX] = b.float()
            state[name + A_SUFFIX] = a.float()
        return state
