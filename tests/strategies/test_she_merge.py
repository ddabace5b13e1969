"""SHE-LoRA merge is exact before each client's own truncation (unequal ranks).

Three clients of ranks 2, 4 and 8 (maximum 8) on 20 x 24 matrices: the sum of their
updates has rank 14 > 8, so a plaintext merge cut to the maximum rank loses part of
it. Driven with real Flower messages: the server's ``node_content`` /
``aggregate_train`` and the client's ``sealed_reply`` / ``received_updates`` /
``received_state``. References are float64: the weighted mean of ``s_i B_i A_i``
and its best rank-``r_i`` approximation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Message
from hetero_messages import lora_state, she_reply
from lowrank_reference import mean_update
from torch import Tensor

from fedlora.client.she import received_state, received_updates
from fedlora.config import AdapterConfig, ClientConfig
from fedlora.lora.rank import best_rank_factors
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, from_record
from fedlora.protocol import SHE_PLAIN
from fedlora.she.keys import create_contexts, load_secret_context
from strategies.rank_aware import NodeInfo
from strategies.she_lora import SheLora

pytestmark = pytest.mark.usefixtures("flower_task_identity")

M, N, MAX_RANK, ALPHA = 20, 24, 8, 16.0
MATRICES = ("x", "y")
RANKS = {1: 2, 2: 4, 3: 8}  # sum 14 > MAX_RANK, < min(M, N)
SIZES = {1: 30, 2: 50, 3: 20}
COLUMNS = {"x": [6, 2, 9], "y": [0, 23, 5]}  # node n encrypts the first n


def _global() -> dict[str, Tensor]:
    return lora_state(MAX_RANK, shape=(M, N), seed=7, matrices=MATRICES, zero_b=True)


def _trained(rank: int, seed: int) -> dict[str, Tensor]:
    return lora_state(rank, shape=(M, N), seed=seed, matrices=MATRICES)


def _strategy(public: Path) -> SheLora:
    strategy = SheLora(
        public_context=str(public),
        max_rank=MAX_RANK,
        alpha=ALPHA,
        use_rslora=False,
        min_train_nodes=2,
        min_available_nodes=2,
    )
    strategy.global_state = _global()
    strategy.nodes = {n: NodeInfo(r, n, n) for n, r in RANKS.items()}  # budget = n
    strategy.columns = {k: list(v) for k, v in COLUMNS.items()}
    return strategy


def _cfg(rank: int) -> ClientConfig:
    return ClientConfig(adapter=AdapterConfig(rank=rank, alpha=ALPHA))


def _reply(
    strategy: SheLora, node: int, ctx: Any, trained: dict[str, Tensor]
) -> Message:
    """What the ClientApp sends back for ``trained`` (real ``sealed_reply``)."""
    reply, _ = she_reply(
        strategy, node, ctx, trained, rank=RANKS[node], alpha=ALPHA, size=SIZES[node]
    )
    return reply


def _exact_means(states: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """Float64 ``sum_i p_i s_i B_i A_i`` per matrix (``p_i`` from the sizes)."""
    return {
        n: mean_update(
            [(s[n + B_SUFFIX], s[n + A_SUFFIX]) for s in states.values()],
            [float(SIZES[i]) for i in states],
            [ALPHA / RANKS[i] for i in states],
        )
        for n in MATRICES
    }


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_contexts(tmp_path_factory.mktemp("he"))


@pytest.fixture
def merged(keys: tuple[Path, Path]) -> tuple[SheLora, dict[str, Tensor], Any]:
    """A strategy after round 1 of three clients, the exact means, the secret key."""
    secret = load_secret_context(keys[0])
    strategy = _strategy(keys[1])
    states = {n: _trained(r, 10 + n) for n, r in RANKS.items()}
    replies = [_reply(strategy, n, secret, s) for n, s in states.items()]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.stats[1].accepted == len(RANKS)
    strategy.global_state = from_record(arrays)
    want = _exact_means(states)
    for n in MATRICES:  # the premise: the sum has more rank than any client
        assert int(torch.linalg.matrix_rank(want[n])) == sum(RANKS.values())
    return strategy, want, secret


def test_client_rebuilds_the_exact_mean_before_its_own_truncation(
    merged: tuple[SheLora, dict[str, Tensor], Any],
) -> None:
    strategy, want, secret = merged
    for node, rank in RANKS.items():
        content = strategy.node_content(2, node, ConfigRecord({"server-round": 2}))
        dense = received_updates(content, secret)
        for n in MATRICES:
            assert _rel(dense[n], want[n]) < 1e-6, (node, n, _rel(dense[n], want[n]))

        state, _ = received_state(content, _cfg(rank), secret)
        for n in MATRICES:
            b, a = best_rank_factors(want[n], rank, 1.0)
            got = (
                (ALPHA / rank)
                * state[n + B_SUFFIX].double()
                @ state[n + A_SUFFIX].double()
            )
            assert state[n + A_SUFFIX].shape == (rank, N)
            assert _rel(got, b @ a) < 1e-5, (node, n, _rel(got, b @ a))
        # sent at the rank the sum has, min(sum r_i, m, n), not at MAX_RANK
        sent = from_record(content.array_records[SHE_PLAIN])
        assert sent["x" + B_SUFFIX].shape == (M, sum(RANKS.values()))


def test_resumed_server_sends_the_same_exact_merge(
    merged: tuple[SheLora, dict[str, Tensor], Any],
    keys: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """``checkpoint_attrs`` carry the full-rank plaintext merge through a restart."""
    strategy, want, secret = merged
    torch.save(strategy.checkpoint_state(), tmp_path / "strategy.pt")
    resumed = _strategy(keys[1])
    resumed.columns = {}
    resumed.load_checkpoint_state(
        torch.load(tmp_path / "strategy.pt", weights_only=True)
    )
    resumed.global_state = strategy.global_state
    assert resumed.columns == COLUMNS
    for node in RANKS:
        config = ConfigRecord({"server-round": 2})
        dense = received_updates(resumed.node_content(2, node, config), secret)
        for n in MATRICES:
            assert _rel(dense[n], want[n]) < 1e-6
