"""strategy.server_momentum / server_lr (FedAvgM) on the adapter factors: the server
step against a hand computation over two rounds, FedAvg when off, resumable, and
refused where a factor is frozen for the round."""

from __future__ import annotations

import pytest
import torch
from flwr.app import RecordDict
from hetero_messages import train_metrics, train_reply
from tiny_configs import tiny_config

from fedlora.config.flat import ConfigError
from fedlora.lora.state import from_record, to_record
from strategies.fedavg_lora import FedAvgLora, server_step

pytestmark = pytest.mark.usefixtures("flower_task_identity")

State = dict[str, torch.Tensor]
SHAPES = {"x.lora_A.weight": (3, 5), "x.lora_B.weight": (5, 3)}


def _state(seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def _round(strategy: FedAvgLora, rnd: int, replies: list[tuple[State, int]]) -> State:
    messages = [
        train_reply(
            node, RecordDict({"arrays": to_record(s), "metrics": train_metrics(n)})
        )
        for node, (s, n) in enumerate(replies, start=1)
    ]
    arrays, _ = strategy.aggregate_train(rnd, messages)
    assert arrays is not None
    strategy.global_state = from_record(arrays)
    return strategy.global_state


def _mean(replies: list[tuple[State, int]]) -> State:
    total = sum(n for _, n in replies)
    return {k: sum(s[k] * n for s, n in replies) / total for k in SHAPES}


def test_two_rounds_follow_v_equals_beta_v_plus_delta_and_global_plus_lr_v() -> None:
    beta, lr = 0.9, 0.5
    strategy = FedAvgLora(
        min_train_nodes=1, min_available_nodes=1, server_momentum=beta, server_lr=lr
    )
    g0 = _state(0)
    strategy.global_state = {k: v.clone() for k, v in g0.items()}
    r1 = [(_state(1), 30), (_state(2), 10)]  # unequal data sizes: weighted mean
    g1 = _round(strategy, 1, r1)
    d1 = {k: _mean(r1)[k] - g0[k] for k in SHAPES}
    for k in SHAPES:  # v1 = d1
        torch.testing.assert_close(g1[k], g0[k] + lr * d1[k])
    r2 = [(_state(3), 20), (_state(4), 20), (_state(5), 5)]
    g2 = _round(strategy, 2, r2)
    for k in SHAPES:  # v2 = beta d1 + d2, d2 measured from g1
        d2 = _mean(r2)[k] - g1[k]
        torch.testing.assert_close(g2[k], g1[k] + lr * (beta * d1[k] + d2))


def test_without_momentum_and_at_server_lr_1_the_round_is_fedavg() -> None:
    replies = [(_state(1), 7), (_state(2), 3)]
    strategy = FedAvgLora(min_train_nodes=1, min_available_nodes=1)
    strategy.global_state = _state(0)
    out = _round(strategy, 1, replies)
    for k in SHAPES:
        torch.testing.assert_close(out[k], _mean(replies)[k])
    assert strategy.velocity == {}  # no server step was taken
    new, _ = server_step(_state(0), _mean(replies), {}, momentum=0.0, lr=1.0)
    for k in SHAPES:
        torch.testing.assert_close(new[k], _mean(replies)[k])


def test_a_resumed_strategy_continues_with_the_saved_velocity() -> None:
    def fresh() -> FedAvgLora:
        s = FedAvgLora(min_train_nodes=1, min_available_nodes=1, server_momentum=0.8)
        s.global_state = _state(0)
        return s

    rounds = [[(_state(1), 5), (_state(2), 5)], [(_state(3), 5), (_state(4), 9)]]
    straight = fresh()
    for rnd, replies in enumerate(rounds, start=1):
        expected = _round(straight, rnd, replies)
    first = fresh()
    after_one = _round(first, 1, rounds[0])
    resumed = FedAvgLora(min_train_nodes=1, min_available_nodes=1, server_momentum=0.8)
    resumed.load_checkpoint_state(first.checkpoint_state())
    resumed.global_state = after_one
    got = _round(resumed, 2, rounds[1])
    assert all(torch.equal(got[k], expected[k]) for k in SHAPES)
    assert resumed.velocity  # and a run without the saved velocity would differ
    lost = FedAvgLora(min_train_nodes=1, min_available_nodes=1, server_momentum=0.8)
    lost.global_state = after_one
    assert not torch.equal(
        _round(lost, 2, rounds[1])["x.lora_A.weight"], got["x.lora_A.weight"]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.server_momentum": 1.0}, "strategy.server_momentum"),
        ({"strategy.server_lr": 0.0}, "strategy.server_lr"),
        (
            {"strategy.name": "hetlora", "strategy.server_momentum": 0.9},
            "strategy=fedavg",
        ),
        (
            {"adapter.variant": "rolora", "strategy.server_momentum": 0.9},
            "adapter=rolora",
        ),
        ({"adapter.variant": "ffa", "strategy.server_lr": 2.0}, "adapter=ffa"),
    ],
)
def test_server_steps_are_refused_where_they_are_undefined(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config("classification", overrides)


def test_the_config_reaches_the_strategy() -> None:
    cfg = tiny_config(
        "classification", {"strategy.server_momentum": 0.9, "strategy.server_lr": 0.7}
    )
    strategy = FedAvgLora.from_config(cfg)
    assert (strategy.server_momentum, strategy.server_lr) == (0.9, 0.7)
