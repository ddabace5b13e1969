"""HetLoRA through the strategy, with unequal ranks and the LoRA scale s = alpha / r.

References in float64: one client merged alone is its own update ``s_i B_i A_i``;
the default (norm-weighted) merge of mixed ranks is recomputed by hand; what a
node receives reproduces the global update restricted to its first components.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    Message,
    RecordDict,
)
from hetero_messages import lora_state, train_metrics, train_reply

from fedlora.lora.state import from_record
from strategies.hetlora import HetLora
from strategies.rank_aware import NodeInfo

pytestmark = pytest.mark.usefixtures("flower_task_identity")

M, N, MAX_RANK, ALPHA = 12, 10, 16, 16.0
A, B = "x.lora_A.weight", "x.lora_B.weight"


def _global() -> dict[str, torch.Tensor]:
    return lora_state(MAX_RANK, shape=(M, N), seed=3, head_rows=2, zero_b=True)


def _trained(rank: int, seed: int) -> dict[str, torch.Tensor]:
    return lora_state(rank, shape=(M, N), seed=seed, head_rows=2)


def _reply(node: int, state: dict[str, torch.Tensor], n: int) -> Message:
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": train_metrics(n)})
    return train_reply(node, content)


def _strategy(ranks: dict[int, int], **kwargs: Any) -> HetLora:
    """HetLora as ``from_config`` builds it (``norm_weighting`` defaults to True)."""
    strategy = HetLora(
        max_rank=MAX_RANK,
        alpha=ALPHA,
        use_rslora=False,
        min_train_nodes=1,
        min_available_nodes=1,
        **kwargs,
    )
    strategy.global_state = _global()
    strategy.nodes = {n: NodeInfo(r, 0, n) for n, r in ranks.items()}
    return strategy


def _update(state: dict[str, torch.Tensor], rank: int) -> torch.Tensor:
    """``s B A`` in float64 for a state of ``rank``."""
    return (ALPHA / rank) * state[B].double() @ state[A].double()


def test_a_single_low_rank_client_merged_alone_is_its_own_update() -> None:
    strategy = _strategy({1: 4})
    mine = _trained(4, seed=1)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, mine, 40)])
    assert arrays is not None
    got = from_record(arrays)
    torch.testing.assert_close(
        _update(got, MAX_RANK), _update(mine, 4), rtol=1e-6, atol=1e-6
    )
    # and the node gets back exactly its own update at its own scale
    strategy.global_state = got  # as configure_train sets it next round
    back = strategy.client_state(2, 1)
    assert back[B].shape == (M, 4) and back[A].shape == (4, N)
    torch.testing.assert_close(_update(back, 4), _update(mine, 4), rtol=1e-6, atol=1e-6)


def test_default_norm_weighted_merge_of_mixed_ranks_matches_a_hand_computation() -> (
    None
):
    ranks, sizes = {1: 2, 2: 4, 3: 16}, {1: 30, 2: 50, 3: 20}
    strategy = _strategy(ranks)
    assert strategy.norm_weighting  # the shipped default
    states = {n: _trained(r, seed=n) for n, r in ranks.items()}
    replies = [_reply(n, s, sizes[n]) for n, s in states.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    got = from_record(arrays)
    s_max = ALPHA / MAX_RANK
    weights = {
        n: sizes[n] * float(_update(states[n], r).norm()) for n, r in ranks.items()
    }
    total = sum(weights.values())
    want_b = torch.zeros(M, MAX_RANK, dtype=torch.float64)
    want_a = torch.zeros(MAX_RANK, N, dtype=torch.float64)
    for n, r in ranks.items():
        p = weights[n] / total
        want_b[:, :r] += p * states[n][B].double() * (ALPHA / r) / s_max
        want_a[:r, :] += p * states[n][A].double()
    torch.testing.assert_close(got[B].double(), want_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[A].double(), want_a, rtol=1e-5, atol=1e-6)
    # each node receives the global update cut to its first r_i components
    strategy.global_state = got  # as configure_train sets it next round
    for n, r in ranks.items():
        back = strategy.client_state(2, n)
        want = s_max * got[B][:, :r].double() @ got[A][:r].double()
        torch.testing.assert_close(_update(back, r), want, rtol=1e-5, atol=1e-6)
