"""FedAvg-LoRA (FedIT) [Zhang et al., 2024] on top of FedAvg [McMahan et al., 2017].

Paper: "Towards Building the Federated GPT: Federated Instruction Tuning",
arXiv:2305.05644; FedAvg: "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora import protocol as proto
from fedlora.lora.residual import Residual
from fedlora.lora.state import (
    PROJECTION,
    StateDict,
    factor_of,
    fingerprint,
    from_record,
    select,
    to_record,
)
from fedlora.lora.variants import VARIANTS, Variant
from strategies.aggregation import merge_into, weighted_mean
from strategies.client_reports import client_nodes, client_times, metric
from strategies.config import ExperimentConfig
from strategies.validation import reply_problem


@dataclass
class RoundStats:
    """Bookkeeping of one training round (what the run directory reports)."""

    sampled: int = 0
    accepted: int = 0
    dropped: list[tuple[int, str]] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    train_loss: float | None = None
    client_train_seconds: list[float] = field(default_factory=list)
    # partition id -> where its reply was computed (``client_nodes``)
    placement: dict[str, str] = field(default_factory=dict)
    # privacy=dp: nodes whose budget is spent, and each replying client's report
    exhausted: list[int] = field(default_factory=list)
    privacy: dict[int, dict[str, float]] = field(default_factory=dict)
    # strategy-specific figures for metrics.jsonl (e.g. SHE-LoRA's HE costs)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def epsilon(self) -> float | None:
        """Largest epsilon spent by any replying client (None without DP)."""
        values = [p["epsilon"] for p in self.privacy.values()]
        return max(values) if values else None


def server_step(
    old: StateDict,
    average: StateDict,
    velocity: StateDict,
    *,
    momentum: float,
    lr: float,
) -> tuple[StateDict, StateDict]:
    """FedAvgM's server update of every tensor (Hsu, Qi and Brown, 2019).

    With ``d = average - old`` (the FedAvg pseudo-gradient, negated) and ``v``
    starting at 0: ``v <- momentum * v + d`` and ``new = old + lr * v``. Momentum 0
    and lr 1 give ``new = average``, i.e. FedAvg.

    Returns
    -------
    tuple[StateDict, StateDict]
        The new global adapter and the new velocity (same keys and shapes as
        ``average``; float32).
    """
    new, moved = {}, {}
    for key, avg in average.items():
        if factor_of(key) == PROJECTION:  # VeRA's shared projections never move
            new[key] = old[key]
            continue
        delta = avg.float() - old[key].float()
        prev = velocity.get(key)
        v = delta if prev is None else momentum * prev + delta
        moved[key] = v
        new[key] = old[key].float() + lr * v
    return new, moved


class FedAvgLora(FedAvg):
    """Example-weighted FedAvg over the adapter tensors only.

    What is averaged: the LoRA factors A and B *separately* (and the task head when
    it is trained). The product of the averaged factors is **not** the average of
    the clients' updates ``B_i A_i`` unless the factors agree across clients; use a
    product-level strategy when that matters. Replies are validated (keys, shapes,
    dtype, finite values, size) before any arithmetic; a bad reply is dropped with
    a logged reason and the round continues with the others.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Share of available nodes sampled for training each round.
    fraction_evaluate : float (default: 0.0)
        Share of nodes sampled for federated evaluation (0 disables it).
    min_train_nodes : int (default: 2)
        Minimum valid replies for a round to update the global adapter.
    min_available_nodes : int (default: 2)
        Nodes that must be connected before sampling.
    weighting : str (default: "num_examples")
        ``num_examples`` weights clients by data size, ``uniform`` equally.
    variant : Variant (default: plain LoRA)
        The clients' local update rule: which factors go down and come back up
        each round. Tensors not sent down are checked by fingerprint.
    transport_dtype : str (default: "float32")
        Element type of the adapter tensors in every message, both ways
        (``federation.transport_dtype``); a reply in another dtype is dropped.
        The global adapter and the aggregation stay float32.
    """

    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_available_nodes: int = 2,
        weighting: str = "num_examples",
        variant: Variant | None = None,
        transport_dtype: str = "float32",
        server_momentum: float = 0.0,
        server_lr: float = 1.0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_train_nodes if fraction_evaluate > 0 else 0,
            min_available_nodes=min_available_nodes,
        )
        self.weighting = weighting
        self.variant = variant or VARIANTS.get("lora")
        self.transport_dtype = transport_dtype
        self.server_momentum = server_momentum
        self.server_lr = server_lr
        # FedAvgM's velocity per tensor (float32, like the global adapter); saved in
        # the checkpoint so that a resumed run continues the same trajectory.
        self.velocity: StateDict = {}
        self.global_state: StateDict | None = None
        self.stats: dict[int, RoundStats] = {}

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> FedAvgLora:
        """Build from the experiment config (sampling, weighting, variant)."""
        fed = cfg.federation
        return cls(
            fraction_train=fed.fraction_train,
            fraction_evaluate=fed.fraction_evaluate,
            min_train_nodes=min(fed.min_clients, fed.clients),
            min_available_nodes=min(fed.min_clients, fed.clients),
            weighting=cfg.strategy.weighting,
            variant=VARIANTS.get(cfg.adapter.variant),
            transport_dtype=fed.transport_dtype,
            server_momentum=cfg.strategy.server_momentum,
            server_lr=cfg.strategy.server_lr,
        )

    # Attributes that a checkpoint must restore (subclasses name their own state).
    checkpoint_attrs: tuple[str, ...] = ()
    # False when the server cannot rebuild the merged model (SHE-LoRA: only the key
    # holders can), so evaluation is federated only and no adapter is exported.
    server_can_evaluate: ClassVar[bool] = True

    def base_residual(self) -> Residual:
        """Return the frozen delta beside the base that the global model includes.

        Empty here; FLoRA keeps its merged updates there (``matrix -> (B, A)``).
        """
        return {}

    def checkpoint_state(self) -> dict[str, object]:
        """Return what resuming needs besides the global adapter."""
        state: dict[str, object] = {a: getattr(self, a) for a in self.checkpoint_attrs}
        state["privacy"] = {r: s.privacy for r, s in self.stats.items()}
        state["velocity"] = dict(self.velocity)
        return state

    def load_checkpoint_state(self, state: dict[str, object]) -> None:
        """Restore :meth:`checkpoint_state` (the DP reports feed summary.json)."""
        for attr in self.checkpoint_attrs:
            setattr(self, attr, state[attr])
        velocity = state.get("velocity", {})
        assert isinstance(velocity, dict)
        self.velocity = dict(velocity)
        privacy = state.get("privacy", {})
        assert isinstance(privacy, dict)
        for rnd, reports in privacy.items():
            self.stats.setdefault(int(rnd), RoundStats()).privacy = dict(reports)

    def _global(self) -> StateDict:
        if self.global_state is None:
            raise RuntimeError("global_state is unset: call configure_train first")
        return self.global_state

    def wire(self, state: StateDict) -> ArrayRecord:
        """Return ``state`` as a message record in the transport dtype.

        Only for records that leave the server; ``arrays`` handed between rounds
        (``aggregate_train`` -> ``configure_train``) stay float32.
        """
        return to_record(state, self.transport_dtype)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes and send each the global adapter (byte count recorded)."""
        self.global_state = from_record(arrays)
        down = select(self.global_state, self.variant.sends_down(server_round))
        kept = [k for k in self.global_state if k not in down]
        if kept:
            config[proto.FROZEN_FINGERPRINT] = fingerprint(self.global_state, kept)
        messages = list(
            super().configure_train(server_round, self.wire(down), config, grid)
        )
        self.record_down(server_round, messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation: the global adapter in the transport dtype.

        Only what training sends travels (not FFA's A, not VeRA's projections):
        a site evaluates with its own copy, checked against the fingerprint. Sent
        in a 16-bit dtype, the frozen tensors would overwrite the site's exact ones
        and fail the next round's check.
        """
        state = from_record(arrays)
        down = select(state, self.variant.sends_down(server_round))
        kept = [k for k in state if k not in down]
        if kept:
            config[proto.FROZEN_FINGERPRINT] = fingerprint(state, kept)
        return super().configure_evaluate(server_round, self.wire(down), config, grid)

    def record_down(self, server_round: int, messages: list[Message]) -> None:
        """Count the sampled nodes and the serialised bytes sent to them."""
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.sampled = len(messages)
        stats.bytes_down = sum(
            recorddict_to_proto(m.content).ByteSize() for m in messages
        )

    def expected_reply(self, server_round: int) -> dict[str, tuple[int, ...]]:
        """Adapter key -> shape every client must send back this round."""
        sent = select(self._global(), self.variant.factors_for_round(server_round))
        return {k: tuple(v.shape) for k, v in sent.items()}

    def reply_problem(self, server_round: int, msg: Message) -> str | None:
        """Why a reply cannot be aggregated (None if it can). Per node hook."""
        return reply_problem(
            msg, self.expected_reply(server_round), dtype=self.transport_dtype
        )

    def merge(
        self, server_round: int, replies: list[Message], weights: list[float]
    ) -> StateDict:
        """Return the new global adapter from the valid replies (FedAvg per tensor)."""
        del server_round
        states = [from_record(m.content.array_records[proto.ARRAYS]) for m in replies]
        return merge_into(self._global(), weighted_mean(states, weights))

    def _record_privacy(
        self, server_round: int, msg: Message, stats: RoundStats
    ) -> bool:
        """Keep a DP client's privacy report; True if its budget is spent."""
        metrics = msg.content.metric_records.get(proto.METRICS)
        dp = None if metrics is None else proto.PrivacyReport.from_metrics(metrics)
        if metrics is None or dp is None:
            return False
        report = {
            k: float(v) for k, v in dp.to_metrics().items() if k != "dp-exhausted"
        }
        report[proto.PARTITION_ID] = metric(metrics, proto.PARTITION_ID)
        node = msg.metadata.src_node_id
        stats.privacy[node] = report
        if dp.exhausted:
            stats.exhausted.append(node)
            log(
                WARNING,
                "fedlora: round %d: node %d (partition %d) stopped training: its "
                "privacy budget "
                "is spent (epsilon %.3f); the round goes on without it",
                server_round,
                node,
                int(report[proto.PARTITION_ID]),
                report["epsilon"],
            )
            return True
        return False

    def privacy_summary(self) -> dict[str, dict[str, float]]:
        """Latest privacy report per client partition (all rounds), for summary.json."""
        latest: dict[str, dict[str, float]] = {}
        for rnd in sorted(self.stats):
            for report in self.stats[rnd].privacy.values():
                key = f"partition-{int(report[proto.PARTITION_ID])}"
                latest[key] = {**report, "last_round": float(rnd)}
        return latest

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, drop bad ones with a logged reason, average the rest."""
        replies = list(replies)
        stats = self.stats.setdefault(server_round, RoundStats())
        good: list[Message] = []
        for msg in replies:
            if not msg.has_error():
                stats.bytes_up += recorddict_to_proto(msg.content).ByteSize()
                if self._record_privacy(server_round, msg, stats):
                    continue  # budget spent: nothing to aggregate, not an error
            reason = self.reply_problem(server_round, msg)
            if reason is None:
                good.append(msg)
                continue
            node = msg.metadata.src_node_id
            stats.dropped.append((node, reason))
            log(
                WARNING,
                "fedlora: round %d: dropping reply of node %d: %s",
                server_round,
                node,
                reason,
            )
        stats.accepted = len(good)
        metrics = [m.content.metric_records[proto.METRICS] for m in good]
        stats.extra.update(client_times(metrics))  # also when too few to apply
        stats.placement = client_nodes(good)
        if len(good) < max(1, self.min_train_nodes):
            log(
                WARNING,
                "fedlora: round %d: %d valid replies, fewer than the minimum %d; "
                "the global adapter is unchanged this round",
                server_round,
                len(good),
                max(1, self.min_train_nodes),
            )
            return None, None
        weights = [
            metric(m, proto.NUM_EXAMPLES) if self.weighting == "num_examples" else 1.0
            for m in metrics
        ]
        new_global = self.merge(server_round, good, weights)
        if self.server_momentum or self.server_lr != 1.0:
            new_global, self.velocity = server_step(
                self._global(), new_global, self.velocity,
                momentum=self.server_momentum, lr=self.server_lr,
            )  # fmt: skip
        losses = [metric(m, proto.TRAIN_LOSS) for m in metrics]
        stats.train_loss = sum(
            w * x for w, x in zip(weights, losses, strict=True)
        ) / sum(weights)
        stats.client_train_seconds = [metric(m, proto.TRAIN_SECONDS) for m in metrics]
        log(
            INFO,
            "Round %d: aggregated %d of %d replies",
            server_round,
            len(good),
            len(replies),
        )
        return to_record(new_global), MetricRecord({proto.TRAIN_LOSS: stats.train_loss})
