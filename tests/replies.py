"""Train replies as a ClientApp sends them, for strategy tests that skip Flower.

A reply is a Message answering a train instruction, with the adapter tensors in
``"arrays"`` and the metrics a client reports in ``"metrics"``.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from torch import Tensor


def train_metrics(n: int, **extra: float) -> MetricRecord:
    """A client's train metrics for ``n`` local examples."""
    return MetricRecord(
        {"num-examples": n, "train-loss": 1.0, "train-seconds": 0.1, **extra}
    )


def train_reply(node: int, content: RecordDict) -> Message:
    """``content`` as node ``node``'s reply to a train instruction."""
    sent = Message(
        RecordDict({"config": ConfigRecord()}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    return Message(content, reply_to=sent)


def adapter_reply(node: int, state: Mapping[str, Tensor], n: int) -> Message:
    """Node ``node``'s reply carrying adapter ``state`` trained on ``n`` examples."""
    content = RecordDict(
        {"arrays": ArrayRecord(dict(state)), "metrics": train_metrics(n)}
    )
    return train_reply(node, content)
