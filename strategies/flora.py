"""FLoRA [Wang et al., NeurIPS 2024]: stack the clients' adapters, merge, restart.

Paper: "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations". Each round the server stacks ``[B_1 | ... | B_K]`` and
``[p_1 s_1 A_1; ...; p_K s_K A_K]`` (weights and each client's own LoRA scale
folded into A only, so they are not applied twice), whose product is exactly
``sum_i p_i s_i B_i A_i``, and adds it to the model. Here that merged update is a
full-precision residual *beside* the 4-bit base (``fedlora.lora.residual``),
accumulated over rounds; every client restarts from the shared initial adapter
(A from the seed, B = 0) at its own rank.

Downlink: the accumulated residual, ``R (m + n)`` floats per matrix, where ``R``
grows by ``sum r_i`` each round until it reaches ``min(m, n)``; beyond that it is
recompressed by an SVD at rank ``min(m, n)``, which is exact.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from torch import Tensor

from fedlora import protocol as proto
from fedlora.lora.rank import stack_factors
from fedlora.lora.residual import Residual
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, pairs_state
from strategies.aggregation import normalise_weights
from strategies.rank_aware import HeteroRankLora


def append_stack(
    residual: tuple[Tensor, Tensor] | None, stack: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """Residual + stacked update, recompressed (exactly) once wider than needed.

    Both are ``(B: (m, R), A: (R, n))`` with scale 1; float64 in, float64 out.
    """
    b, a = stack
    if residual is not None:
        b = torch.cat([residual[0].double(), b.double()], dim=1)
        a = torch.cat([residual[1].double(), a.double()], dim=0)
    full = min(b.shape[0], a.shape[1])
    if b.shape[1] <= full:
        return b.double(), a.double()
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    return u[:, :full] * s[:full], vh[:full]


class Flora(HeteroRankLora):
    """Stacking aggregation: exact, any rank mix, a residual that grows."""

    checkpoint_attrs = ("residual",)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The merged updates of every round so far, matrix -> (B_res, A_res).
        self.residual: dict[str, tuple[Tensor, Tensor]] = {}

    def base_residual(self) -> Residual:
        """Return the accumulated merged update (kept beside the base)."""
        return self.residual

    def merge_factors(
        self,
        server_round: int,
        name: str,
        factors: list[tuple[Tensor, Tensor]],
        weights: list[float],
        ranks: list[int],
    ) -> tuple[Tensor, Tensor]:
        """Add this round's stack to the residual; the adapter restarts."""
        del server_round
        scales = [self.scale(r) for r in ranks]
        stack = stack_factors(factors, normalise_weights(weights), scales)
        self.residual[name] = tuple(  # type: ignore[assignment]
            t.float() for t in append_stack(self.residual.get(name), stack)
        )
        glob = self._global()
        return glob[name + B_SUFFIX], glob[name + A_SUFFIX]

    def node_content(
        self, server_round: int, node: int, config: ConfigRecord
    ) -> RecordDict:
        """Send the shared initial adapter at the node's rank, plus the residual."""
        content = super().node_content(server_round, node, config)
        if self.residual:
            # adapter-sized like ARRAYS (and most of FLoRA's downlink): transport
            # dtype too; the server keeps its float32 copy, so rounding never adds up
            content[proto.RESIDUAL] = self.wire(pairs_state(self.residual))
        return content
