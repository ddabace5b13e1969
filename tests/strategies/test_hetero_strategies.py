"""HetLoRA / FlexLoRA / SHE-LoRA strategies on hand-built replies (no Flower run).

References: FedAvg for equal-rank HetLoRA, a direct SVD of the weighted mean of the
products for FlexLoRA, and the plaintext product-level merge for SHE-LoRA.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_grid import ReplyingGrid
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from hetero_messages import HEAD, lora_state, she_reply, train_metrics, train_reply
from lowrank_reference import mean_update

from fedlora.client.she import received_state
from fedlora.config import AdapterConfig, ClientConfig
from fedlora.lora.rank import best_rank_factors
from fedlora.lora.state import from_record
from fedlora.she.keys import HEContextError, create_contexts, load_secret_context
from strategies.aggregation import weighted_mean
from strategies.flexlora import FlexLora
from strategies.flora import Flora
from strategies.hetlora import HetLora
from strategies.rank_aware import NodeInfo
from strategies.she_lora import SheLora

pytestmark = pytest.mark.usefixtures("flower_task_identity")

M, N, MAX_RANK, ALPHA = 8, 10, 8, 16.0
A, B = "x.lora_A.weight", "x.lora_B.weight"


def _global() -> dict[str, torch.Tensor]:
    return lora_state(MAX_RANK, shape=(M, N), seed=7, zero_b=True)


def _trained(rank: int, seed: int) -> dict[str, torch.Tensor]:
    return lora_state(rank, shape=(M, N), seed=seed)


def _kwargs() -> dict[str, Any]:
    return {
        "max_rank": MAX_RANK,
        "alpha": ALPHA,
        "use_rslora": False,
        "min_train_nodes": 2,
        "min_available_nodes": 2,
    }


RANKS = {1: 2, 2: 4, 3: 8}
SIZES = {1: 30, 2: 50, 3: 20}


def test_hetlora_with_equal_ranks_equals_fedavg() -> None:
    strategy = HetLora(norm_weighting=False, **_kwargs())
    strategy.global_state = _global()
    strategy.nodes = {n: NodeInfo(MAX_RANK, 0, n) for n in RANKS}
    states = {n: _trained(MAX_RANK, n) for n in RANKS}
    replies = [
        train_reply(
            n,
            RecordDict({"arrays": ArrayRecord(s), "metrics": train_metrics(SIZES[n])}),
        )
        for n, s in states.items()
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    want = weighted_mean(list(states.values()), list(SIZES.values()))
    got = from_record(arrays)
    for k in want:
        torch.testing.assert_close(got[k], want[k].float(), rtol=1e-6, atol=1e-6)


def test_flexlora_gives_each_node_the_best_rank_r_of_the_weighted_mean() -> None:
    strategy = FlexLora(**_kwargs())
    strategy.global_state = _global()
    strategy.nodes = {n: NodeInfo(r, 0, n) for n, r in RANKS.items()}
    states = {n: _trained(RANKS[n], n) for n in RANKS}
    replies = [
        train_reply(
            n,
            RecordDict({"arrays": ArrayRecord(s), "metrics": train_metrics(SIZES[n])}),
        )
        for n, s in states.items()
    ]
    # round 1: a node gets the shared initialisation cut to its rank
    assert torch.equal(strategy.client_state(1, 1)[A], _global()[A][:2])
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    want = mean_update(
        [(s[B], s[A]) for s in states.values()],
        list(SIZES.values()),
        [ALPHA / r for r in RANKS.values()],
    )
    for node, rank in RANKS.items():
        state = strategy.client_state(2, node)
        assert state[A].shape == (rank, N) and state[B].shape == (M, rank)
        b, a = best_rank_factors(want, rank, 1.0)
        got = (ALPHA / rank) * state[B].double() @ state[A].double()
        torch.testing.assert_close(got, b @ a, rtol=1e-4, atol=1e-5)


def test_a_reply_at_the_wrong_rank_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    strategy = FlexLora(**_kwargs())
    strategy.global_state = _global()
    strategy.nodes = {n: NodeInfo(r, 0, n) for n, r in RANKS.items()}
    replies = [
        train_reply(
            n,
            RecordDict(
                {"arrays": ArrayRecord(_trained(r, n)), "metrics": train_metrics(10)}
            ),
        )
        for n, r in {1: 2, 2: 4, 3: 4}.items()  # node 3 should send rank 8
    ]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert strategy.stats[1].accepted == 2
    assert "dropping reply of node 3" in caplog.text


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_contexts(tmp_path_factory.mktemp("he"))


def _she(public: Path) -> SheLora:
    strategy = SheLora(public_context=str(public), **_kwargs())
    strategy.global_state = _global()
    strategy.nodes = {n: NodeInfo(r, n, n) for n, r in RANKS.items()}  # budget = n
    strategy.columns = {"x": [6, 2, 9]}
    return strategy


def _she_reply(
    strategy: SheLora, node: int, ctx: Any, trained: dict[str, torch.Tensor]
) -> tuple[Message, RecordDict]:
    return she_reply(
        strategy, node, ctx, trained, rank=RANKS[node], alpha=ALPHA, size=SIZES[node]
    )


def test_she_lora_merge_equals_the_plaintext_product_merge(
    keys: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    secret = load_secret_context(keys[0])
    strategy = _she(keys[1])
    assert not strategy.ctx.is_private()  # the server holds no secret key
    states = {n: _trained(RANKS[n], 10 + n) for n in RANKS}
    replies = [_she_reply(strategy, n, secret, s)[0] for n, s in states.items()]

    # two bad replies: a foreign key pair, and a column that was not negotiated
    other = load_secret_context(create_contexts(keys[0].parent / "other")[0])
    foreign, _ = _she_reply(strategy, 2, other, states[2])
    forged, _ = _she_reply(strategy, 3, secret, states[3])
    forged.content.config_records["she-upload"]["she-cols:x"] = [6, 2, 5]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, [*replies, foreign, forged])
    assert arrays is not None
    assert strategy.stats[1].accepted == 3
    assert "another CKKS key pair" in caplog.text
    assert "not negotiated" in caplog.text

    want = mean_update(
        [(s[B], s[A]) for s in states.values()],
        list(SIZES.values()),
        [ALPHA / r for r in RANKS.values()],
    )
    head = weighted_mean(
        [{HEAD: s[HEAD]} for s in states.values()], list(SIZES.values())
    )
    strategy.global_state = from_record(arrays)
    for node, rank in RANKS.items():
        content = strategy.node_content(2, node, ConfigRecord({"server-round": 2}))
        assert "she-plain" in content.array_records  # no factors the server could read
        cfg = ClientConfig(adapter=AdapterConfig(rank=rank, alpha=ALPHA))
        state, _ = received_state(content, cfg, secret)
        b, a = best_rank_factors(want, rank, 1.0)
        got = (ALPHA / rank) * state[B].double() @ state[A].double()
        torch.testing.assert_close(got, b @ a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state[HEAD], head[HEAD].float())


def test_she_lora_server_refuses_a_secret_context(keys: tuple[Path, Path]) -> None:
    with pytest.raises(HEContextError, match="holds the clients' secret key"):
        SheLora(public_context=str(keys[0]), **_kwargs())


class _Grid(ReplyingGrid):
    """Answers the rank query like ClientApps with the given ranks would."""

    def __init__(self, ranks: dict[int, int]) -> None:
        super().__init__()
        self.ranks = ranks

    def get_node_ids(self) -> list[int]:
        return list(self.ranks)

    def reply(self, msg: Message) -> Message:
        info = MetricRecord(
            {"rank": self.ranks[msg.metadata.dst_node_id], "he-budget": 2}
        )
        return Message(RecordDict({"site": info}), reply_to=msg)


def test_nodes_report_their_rank_and_one_above_the_maximum_is_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = FlexLora(**_kwargs())
    strategy.global_state = _global()
    grid = _Grid({1: 2, 2: 8, 3: 16})
    with caplog.at_level(logging.WARNING):
        nodes = strategy.learn_nodes(grid, [1, 2, 3])  # type: ignore[arg-type]
    assert nodes == [1, 2]
    assert strategy.nodes[1].rank == 2 and strategy.nodes[2].he_budget == 2
    assert "reports LoRA rank 16, outside [1, 8]" in caplog.text
    messages = strategy.configure_train(1, ArrayRecord(_global()), ConfigRecord(), grid)  # type: ignore[arg-type]
    shapes = {
        m.metadata.dst_node_id: tuple(m.content.array_records["arrays"][A].shape)
        for m in messages
    }
    assert shapes == {1: (2, N), 2: (8, N)}


def test_flora_residual_is_the_exact_sum_of_the_rounds_weighted_means() -> None:
    strategy = Flora(**_kwargs())
    strategy.global_state = _global()
    strategy.nodes = {n: NodeInfo(r, 0, n) for n, r in RANKS.items()}
    want = torch.zeros(M, N, dtype=torch.float64)
    for rnd in (1, 2):  # 2 + 4 + 8 = 14 stacked columns > min(M, N) = 8
        states = {n: _trained(RANKS[n], 100 * rnd + n) for n in RANKS}
        replies = [
            train_reply(
                n,
                RecordDict(
                    {"arrays": ArrayRecord(s), "metrics": train_metrics(SIZES[n])}
                ),
            )
            for n, s in states.items()
        ]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        assert arrays is not None
        want += mean_update(
            [(s[B], s[A]) for s in states.values()],
            list(SIZES.values()),
            [ALPHA / r for r in RANKS.values()],
        )
        b, a = strategy.residual["x"]
        assert b.shape[1] == min(M, N)  # recompressed by an exact SVD
        torch.testing.assert_close(b.double() @ a.double(), want, rtol=1e-5, atol=1e-5)
        # the adapter restarts from the shared initialisation every round
        glob = from_record(arrays)
        assert torch.equal(glob[A], _global()[A]) and not glob[B].any()
    content = strategy.node_content(3, 1, ConfigRecord())
    sent = from_record(content.array_records["flora-residual"])
    torch.testing.assert_close(sent["x.lora_B.weight"], strategy.residual["x"][0])
    assert content.array_records["arrays"][A].shape == (2, N)
