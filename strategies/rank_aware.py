"""Shared machinery of the heterogeneous-rank strategies (HetLoRA, FlexLoRA, SHE-LoRA).

The server keeps the global adapter at the maximum rank ``adapter.rank`` and learns
each node's own rank with a one-off Flower *query* message (a site sets it with
node-config ``rank``; in simulation ``federation.client_ranks`` assigns it from the
partition id). Every train/evaluate message then carries exactly the node's rank,
and every reply is validated against the shapes of that rank.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import Tensor

from fedlora import protocol as proto
from fedlora.lora.rank import lora_scale, truncate_rank
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    StateDict,
    factor_pairs,
    from_record,
    matrix_names,
)
from strategies.aggregation import weighted_mean
from strategies.client_reports import metric
from strategies.config import ExperimentConfig
from strategies.fedavg_lora import FedAvgLora
from strategies.server.exchange import send_and_receive
from strategies.validation import reply_problem


@dataclass(frozen=True)
class NodeInfo:
    """What a node told the server about itself in the query round."""

    rank: int
    he_budget: int
    partition_id: int


def head_keys(state: Mapping[str, Tensor]) -> list[str]:
    """Keys of tensors that are not LoRA factors (the trained task head)."""
    return [k for k in state if not k.endswith((A_SUFFIX, B_SUFFIX))]


def truncate_state(
    state: Mapping[str, Tensor], rank: int, *, b_factor: float = 1.0
) -> StateDict:
    """First ``rank`` components of every factor (B columns, A rows); head as is.

    ``b_factor`` multiplies the kept ``B`` columns (HetLoRA's ``s_max / s_i``, so a
    client whose LoRA scale differs from the global one gets the same update).
    """
    out: StateDict = {k: v.clone() for k, v in state.items()}
    for name, (b, a) in factor_pairs(state).items():
        b_r, a_r = truncate_rank(b, a, rank, b_factor=b_factor)
        out[name + B_SUFFIX], out[name + A_SUFFIX] = b_r, a_r
    return out


class HeteroRankLora(FedAvgLora):
    """FedAvgLora whose clients may hold different LoRA ranks (subclasses merge).

    Parameters (besides FedAvgLora's)
    ----------
    max_rank : int
        Rank of the global adapter (``adapter.rank``); no client may exceed it.
    alpha : float
        LoRA alpha shared by every client; client ``i``'s scale is ``alpha / r_i``
        (``alpha / sqrt(r_i)`` with rsLoRA), which the product-level merges use.
    use_rslora : bool
        rsLoRA scaling.
    """

    def __init__(
        self, *, max_rank: int, alpha: float, use_rslora: bool, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.max_rank = max_rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.nodes: dict[int, NodeInfo] = {}
        self.query_timeout = 600.0  # seconds; from_config uses round_timeout

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> HeteroRankLora:
        """Build from the experiment config (sampling, weighting, ranks, alpha)."""
        if cfg.adapter.variant != "lora":
            raise ValueError(
                f"strategy={cfg.strategy.name} merges both LoRA factors of every "
                f"client; adapter={cfg.adapter.variant} trains or sends only one. "
                "Use adapter=lora with this strategy"
            )
        fed = cfg.federation
        strategy = cls(
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=min(fed.min_clients, fed.clients),
            min_available_nodes=min(fed.min_clients, fed.clients),
            weighting=cfg.strategy.weighting,
            max_rank=cfg.adapter.rank,
            alpha=cfg.adapter.alpha,
            use_rslora=cfg.adapter.use_rslora,
            transport_dtype=fed.transport_dtype,
            **cls.extra_kwargs(cfg),
        )
        strategy.query_timeout = fed.round_timeout
        return strategy

    @classmethod
    def extra_kwargs(cls, cfg: ExperimentConfig) -> dict[str, Any]:
        """Strategy-specific constructor arguments from the config."""
        del cfg
        return {}

    def scale(self, rank: int) -> float:
        """LoRA scale of a client of ``rank``."""
        return lora_scale(self.alpha, rank, self.use_rslora)

    # -- learning the nodes -------------------------------------------------

    def query(
        self, grid: Grid, node_ids: Iterable[int], kind: str
    ) -> dict[int, Message]:
        """Send a ``kind`` query to ``node_ids``; return the replies without error."""
        messages = [
            Message(
                RecordDict({proto.CONFIG: ConfigRecord({proto.QUERY: kind})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
            )
            for node in node_ids
        ]
        replies = {}
        for reply in send_and_receive(grid, messages, self.query_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(
                    WARNING,
                    "fedlora: query %s: node %d failed: %s",
                    kind,
                    node,
                    reply.error,
                )
                continue
            replies[node] = reply
        return replies

    def learn_nodes(self, grid: Grid, node_ids: list[int]) -> list[int]:
        """Ask unknown nodes for their rank and HE budget; return usable nodes."""
        unknown = [n for n in node_ids if n not in self.nodes]
        if unknown:
            for node, reply in self.query(grid, unknown, proto.QUERY_SITE).items():
                m = reply.content.metric_records[proto.SITE]
                rank = int(metric(m, proto.RANK))
                if not 1 <= rank <= self.max_rank:
                    log(
                        WARNING,
                        "fedlora: node %d reports LoRA rank %d, outside [1, %d] (the "
                        "global rank adapter.rank); it is left out. Lower its "
                        "node-config rank or raise adapter.rank",
                        node,
                        rank,
                        self.max_rank,
                    )
                    continue
                self.nodes[node] = NodeInfo(
                    rank=rank,
                    he_budget=int(metric(m, proto.HE_BUDGET, 0)),
                    partition_id=int(metric(m, proto.PARTITION_ID, -1)),
                )
            log(
                INFO,
                "Node ranks: %s",
                {n: self.nodes[n].rank for n in unknown if n in self.nodes},
            )
        return [n for n in node_ids if n in self.nodes]

    def sample(self, grid: Grid, fraction: float, minimum: int) -> list[int]:
        """Sample ``fraction`` of the connected nodes (at least ``minimum``)."""
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(
            grid, self.min_available_nodes, max(num_nodes, minimum)
        )
        return node_ids

    # -- what each node gets ------------------------------------------------

    def client_state(self, server_round: int, node: int) -> StateDict:
        """Adapter tensors for ``node`` at its rank (default: truncated global)."""
        del server_round
        return truncate_state(self._global(), self.nodes[node].rank)

    def node_content(
        self, server_round: int, node: int, config: ConfigRecord
    ) -> RecordDict:
        """Train/evaluate message content for ``node``."""
        return RecordDict(
            {
                proto.ARRAYS: self.wire(self.client_state(server_round, node)),
                proto.CONFIG: config,
            }
        )

    def _messages(
        self,
        server_round: int,
        nodes: list[int],
        config: ConfigRecord,
        message_type: str,
    ) -> list[Message]:
        config[proto.SERVER_ROUND] = server_round
        return [
            Message(
                self.node_content(server_round, node, config),
                dst_node_id=node,
                message_type=message_type,
            )
            for node in nodes
        ]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes, learn their ranks, send each its own-rank adapter."""
        self.global_state = from_record(arrays)
        nodes = self.learn_nodes(
            grid, self.sample(grid, self.fraction_train, self.min_train_nodes)
        )
        messages = self._messages(server_round, nodes, config, MessageType.TRAIN)
        self.record_down(server_round, messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation: every sampled node gets the model at its rank."""
        if self.fraction_evaluate == 0.0:
            return []
        self.global_state = from_record(arrays)
        nodes = self.learn_nodes(
            grid, self.sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        )
        return self._messages(server_round, nodes, config, MessageType.EVALUATE)

    # -- replies ------------------------------------------------------------

    def expected_for(self, node: int) -> dict[str, tuple[int, ...]]:
        """Shapes ``node`` must send back: its rank for factors, head as global."""
        rank = self.nodes[node].rank
        return {
            k: tuple(v.shape) for k, v in truncate_state(self._global(), rank).items()
        }

    def reply_problem(self, server_round: int, msg: Message) -> str | None:
        """Validate a reply against the sender's own rank."""
        del server_round
        node = msg.metadata.src_node_id
        if node not in self.nodes:
            return f"node {node} never reported its rank"
        return reply_problem(msg, self.expected_for(node), dtype=self.transport_dtype)

    def merge(
        self, server_round: int, replies: list[Message], weights: list[float]
    ) -> StateDict:
        """Merge the head by FedAvg and every adapted matrix by ``merge_factors``."""
        states = [from_record(m.content.array_records[proto.ARRAYS]) for m in replies]
        ranks = [self.nodes[m.metadata.src_node_id].rank for m in replies]
        glob = self._global()
        new = dict(glob)
        heads = head_keys(glob)
        if heads:
            new.update(
                weighted_mean([{k: s[k] for k in heads} for s in states], weights)
            )
        for name in matrix_names(glob):
            factors = [(s[name + B_SUFFIX], s[name + A_SUFFIX]) for s in states]
            b, a = self.merge_factors(server_round, name, factors, weights, ranks)
            new[name + B_SUFFIX] = b.float()
            new[name + A_SUFFIX] = a.float()
        return new

    def merge_factors(
        self,
        server_round: int,
        name: str,
        factors: list[tuple[Tensor, Tensor]],
        weights: list[float],
        ranks: list[int],
    ) -> tuple[Tensor, Tensor]:
        """Merge one matrix; return the global ``(B, A)`` at ``max_rank``."""
        raise NotImplementedError
