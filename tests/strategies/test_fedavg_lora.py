"""FedAvgLora: reply validation drops bad replies, the round goes on."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedlora.lora.state import from_record
from strategies.aggregation import weighted_mean
from strategies.fedavg_lora import FedAvgLora

pytestmark = pytest.mark.usefixtures("flower_task_identity")

KEYS = {
    "m.lora_A.weight": (4, 8),
    "m.lora_B.weight": (6, 4),
    "m.classifier.weight": (3, 6),
}


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in KEYS.items()}


def _reply(node: int, content: RecordDict | Error) -> Message:
    sent = Message(
        RecordDict({"config": ConfigRecord()}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    return Message(content, reply_to=sent)


def _good(node: int, seed: int, n: int) -> Message:
    return _reply(
        node,
        RecordDict(
            {
                "arrays": ArrayRecord(_state(seed)),
                "metrics": MetricRecord(
                    {"num-examples": n, "train-loss": 1.0 + seed, "train-seconds": 0.5}
                ),
            }
        ),
    )


def _strategy() -> FedAvgLora:
    strategy = FedAvgLora(min_train_nodes=2, min_available_nodes=2)
    strategy.global_state = _state(100)
    return strategy


def _bad_replies() -> dict[str, Message]:
    wrong_keys = {k.replace("lora_A", "lora_X"): v for k, v in _state(1).items()}
    wrong_shape = dict(_state(2), **{"m.lora_B.weight": torch.zeros(6, 5)})
    nan = _state(3)
    nan["m.lora_A.weight"][0, 0] = float("nan")
    f64 = {k: Array(v.double().numpy()) for k, v in _state(4).items()}
    metrics = MetricRecord(
        {"num-examples": 10, "train-loss": 1.0, "train-seconds": 0.1}
    )
    return {
        "wrong keys": _reply(
            11, RecordDict({"arrays": ArrayRecord(wrong_keys), "metrics": metrics})
        ),
        "shape": _reply(
            12, RecordDict({"arrays": ArrayRecord(wrong_shape), "metrics": metrics})
        ),
        "NaN": _reply(13, RecordDict({"arrays": ArrayRecord(nan), "metrics": metrics})),
        "dtype": _reply(
            14, RecordDict({"arrays": ArrayRecord(f64), "metrics": metrics})
        ),
        "client reported an error": _reply(15, Error(code=0, reason="CUDA OOM")),
        "num-examples": _reply(
            16,
            RecordDict(
                {
                    "arrays": ArrayRecord(_state(5)),
                    "metrics": MetricRecord({"train-loss": 1.0}),
                }
            ),
        ),
    }


def test_bad_replies_are_dropped_with_a_reason_and_the_round_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = _strategy()
    good = [_good(1, 7, 30), _good(2, 8, 10)]
    bad = _bad_replies()
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, [*good, *bad.values()])
    assert arrays is not None and metrics is not None
    expected = weighted_mean([_state(7), _state(8)], [30, 10])
    out = from_record(arrays)
    assert all(torch.equal(out[k], expected[k]) for k in KEYS)
    stats = strategy.stats[1]
    assert stats.accepted == 2
    reasons = dict(stats.dropped)
    assert sorted(reasons) == [11, 12, 13, 14, 15, 16]
    for node, (needle, _) in zip(range(11, 17), bad.items(), strict=True):
        assert needle in reasons[node], (node, reasons[node])
        assert f"node {node}" in caplog.text
    assert metrics["train-loss"] == pytest.approx((30 * 8.0 + 10 * 9.0) / 40)


def test_too_few_valid_replies_leave_the_global_adapter_unchanged() -> None:
    strategy = _strategy()
    arrays, _ = strategy.aggregate_train(1, [_good(1, 7, 30), *_bad_replies().values()])
    assert arrays is None
    assert strategy.stats[1].accepted == 1


def test_oversized_reply_is_refused_before_deserialising() -> None:
    strategy = _strategy()
    big = dict(_state(1), **{"m.lora_A.weight": torch.zeros(4, 8 * 1000)})
    msg = _reply(
        9,
        RecordDict(
            {"arrays": ArrayRecord(big), "metrics": MetricRecord({"num-examples": 1})}
        ),
    )
    strategy.aggregate_train(1, [_good(1, 7, 30), _good(2, 8, 10), msg])
    assert "bytes" in dict(strategy.stats[1].dropped)[9]


def test_uniform_weighting() -> None:
    strategy = _strategy()
    strategy.weighting = "uniform"
    arrays, _ = strategy.aggregate_train(1, [_good(1, 7, 30), _good(2, 8, 10)])
    assert arrays is not None
    expected = weighted_mean([_state(7), _state(8)], [1, 1])
    assert all(np.array_equal(arrays[k].numpy(), expected[k].numpy()) for k in KEYS)


def test_a_client_with_a_spent_budget_is_skipped_not_dropped() -> None:
    strategy = _strategy()
    dp = {
        "epsilon": 2.9,
        "dp-noise-multiplier": 0.9,
        "dp-sample-rate": 0.05,
        "dp-steps": 30,
        "dp-delta": 1e-5,
        "partition-id": 3,
    }
    spent = _reply(
        21,
        RecordDict(
            {
                "arrays": ArrayRecord(),
                "metrics": MetricRecord(
                    {
                        "num-examples": 10,
                        "train-loss": float("nan"),
                        "train-seconds": 0.0,
                        "dp-exhausted": 1,
                        **dp,
                    }
                ),
            }
        ),
    )
    good = [_good(1, 7, 30), _good(2, 8, 10)]
    arrays, _ = strategy.aggregate_train(4, [*good, spent])
    stats = strategy.stats[4]
    assert arrays is not None and stats.accepted == 2
    assert stats.exhausted == [21] and not stats.dropped
    assert stats.epsilon == pytest.approx(2.9)
    assert strategy.privacy_summary()["partition-3"]["dp-steps"] == 30


def test_the_round_records_which_node_computed_each_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``client_nodes``: the placement record the ClientApp adds to each reply."""
    import socket

    from fedlora.client.app import with_timings

    monkeypatch.setattr(socket, "gethostname", lambda: "site-a")
    replies = []
    for node, (partition, ray_node) in enumerate([(3, "ab" * 28), (1, ""), (2, "")]):
        reply = _good(node + 1, node, 10)
        reply.content["metrics"]["partition-id"] = partition
        with_timings("train", reply, 0.0, 1.0)  # as the ClientApp does
        if ray_node:  # as in a Ray actor: the node id, not the host
            reply.content["placement"]["ray-node"] = ray_node
        replies.append(reply)
    replies.append(_good(9, 9, 10))  # an older client without a placement record
    strategy = _strategy()
    strategy.aggregate_train(1, replies)
    assert strategy.stats[1].placement == {"1": "site-a", "2": "site-a", "3": "ab" * 6}
