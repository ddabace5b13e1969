"""federation.transport_dtype at the server: what it sends, accepts and aggregates.

The round test drives the ServerApp's round loop (``run_federation``) against the
real ClientApp in this process; every message goes through Flower's protobuf
serialisation both ways, so the byte counters see what a deployment would send.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_grid import ReplyingGrid
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from hetero_messages import lora_state, train_metrics, train_reply
from tiny_configs import tiny_config

from fedlora import protocol as proto
from fedlora.cache import model_bundle
from fedlora.client.app import app as client_app
from fedlora.config.flat import flatten_config
from fedlora.lora.state import adapter_state, from_record, to_record
from strategies.aggregation import weighted_mean
from strategies.config import ExperimentConfig
from strategies.fedavg_lora import FedAvgLora
from strategies.flora import Flora
from strategies.hetlora import HetLora
from strategies.rank_aware import NodeInfo
from strategies.registry import build_strategy
from strategies.server.evaluator import CentralEvaluator
from strategies.server.rounds import run_federation
from strategies.server.rundir import RunDir

pytestmark = pytest.mark.usefixtures("flower_task_identity")

State = dict[str, torch.Tensor]
BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits, round to nearest


# --------------------------------------------------------------------------- #
# Reply validation
# --------------------------------------------------------------------------- #

SHAPES = {"x.lora_A.weight": (8, 256), "x.lora_B.weight": (256, 8)}


def _trained(seed: int) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) for k, s in SHAPES.items()}


def _reply(node: int, state: State, dtype: str) -> Message:
    return train_reply(
        node,
        RecordDict({"arrays": to_record(state, dtype), "metrics": train_metrics(10)}),
    )


def _fedavg() -> FedAvgLora:
    strategy = FedAvgLora(
        min_train_nodes=1, min_available_nodes=1, transport_dtype="bfloat16"
    )
    strategy.global_state = _trained(0)
    return strategy


def _hetlora() -> HetLora:
    strategy = HetLora(
        max_rank=8,
        alpha=16.0,
        use_rslora=False,
        min_train_nodes=1,
        min_available_nodes=1,
        transport_dtype="bfloat16",
    )
    strategy.global_state = _trained(0)
    strategy.nodes = {n: NodeInfo(8, 0, n) for n in (1, 2)}
    return strategy


@pytest.mark.parametrize("make", [_fedavg, _hetlora], ids=["fedavg", "hetlora"])
def test_a_float32_reply_is_dropped_when_bfloat16_is_declared(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = make()
    good, wrong = _reply(1, _trained(1), "bfloat16"), _reply(2, _trained(2), "float32")
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, [good, wrong])
    stats = strategy.stats[1]
    assert stats.accepted == 1 and [n for n, _ in stats.dropped] == [2]
    reason = stats.dropped[0][1]
    # named before the size check (the float32 reply is twice the size allowed)
    assert "dtype float32" in reason and "transport_dtype is 'bfloat16'" in reason
    assert "only bfloat16 is accepted" in reason
    assert "dropping reply of node 2" in caplog.text
    assert arrays is not None
    sent = {k: v.to(torch.bfloat16).float() for k, v in _trained(1).items()}
    out = from_record(arrays)
    assert all(torch.equal(out[k], sent[k]) for k in SHAPES)


def test_a_bfloat16_reply_is_dropped_when_float32_is_declared() -> None:
    strategy = FedAvgLora(min_train_nodes=1, min_available_nodes=1)
    strategy.global_state = _trained(0)
    strategy.aggregate_train(1, [_reply(1, _trained(1), "bfloat16")])
    (node, reason), *_ = strategy.stats[1].dropped
    assert node == 1 and "dtype bfloat16" in reason and "only float32" in reason


def test_flora_sends_adapter_and_residual_in_the_transport_dtype() -> None:
    strategy = Flora(
        max_rank=4,
        alpha=16.0,
        use_rslora=False,
        min_train_nodes=1,
        min_available_nodes=1,
        transport_dtype="bfloat16",
    )
    strategy.global_state = lora_state(4, shape=(8, 10), seed=1)
    strategy.nodes = {1: NodeInfo(2, 0, 0)}
    b, a = torch.randn(8, 6), torch.randn(6, 10)
    strategy.residual = {"x": (b, a)}
    content = strategy.node_content(2, 1, ConfigRecord())
    for name in (proto.ARRAYS, proto.RESIDUAL):
        record = content.array_records[name]
        assert {arr.dtype for arr in record.values()} == {"bfloat16"}, name
    sent = from_record(content.array_records[proto.RESIDUAL])
    assert torch.equal(sent["x.lora_B.weight"], b.to(torch.bfloat16).float())
    assert torch.equal(sent["x.lora_A.weight"], a.to(torch.bfloat16).float())


# --------------------------------------------------------------------------- #
# One round through the ServerApp's round loop and the real ClientApp
# --------------------------------------------------------------------------- #

NODES = {101: 0, 102: 1}  # node id -> partition id


def _config(dtype: str) -> ExperimentConfig:
    return tiny_config(
        "classification",
        {
            "data.num_examples": 160,
            "data.max_test_examples": 16,
            "federation.clients": 2,
            "federation.rounds": 1,
            "federation.local_steps": 2,
            "federation.transport_dtype": dtype,
            "train.batch_size": 8,
        },
    )


def _wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class InProcessGrid(ReplyingGrid):
    """Delivers messages to the real ClientApp, serialised both ways like Flower.

    Keeps, per partition, the adapter each client received and the one it sent
    back (decoded), and the byte counts the client itself reported.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.run_config = flatten_config(cfg)
        self.received: dict[int, State] = {}
        self.sent: dict[int, State] = {}
        self.client_bytes: dict[int, tuple[float, float]] = {}

    def get_node_ids(self) -> list[int]:
        return list(NODES)

    def reply(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        part = NODES[node]
        arrived = Message(
            _wire(msg.content), dst_node_id=node, message_type=msg.metadata.message_type
        )
        context = Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": part, "num-partitions": len(NODES)},
            state=RecordDict(),
            run_config=self.run_config,
        )
        reply = client_app(arrived, context)
        self.received[part] = from_record(arrived.content.array_records[proto.ARRAYS])
        self.sent[part] = from_record(reply.content.array_records[proto.ARRAYS])
        metrics = reply.content.metric_records[proto.METRICS]
        self.client_bytes[part] = (
            float(metrics[proto.BYTES_DOWN]),  # type: ignore[arg-type]
            float(metrics[proto.BYTES_UP]),  # type: ignore[arg-type]
        )
        return Message(_wire(reply.content), reply_to=msg)


class _Evaluator(CentralEvaluator):
    """Starts every run from the same given adapter (the model is cached)."""

    def __init__(self, cfg: ExperimentConfig, start: State) -> None:
        super().__init__(cfg)
        self.start = start

    def initial_state(self) -> State:
        return {k: v.clone() for k, v in self.start.items()}


@pytest.fixture(scope="module")
def start() -> State:
    """A bfloat16-representable adapter: the downlink is exact in bfloat16, so the
    clients of both runs train from the same tensors and only the uplink rounds."""
    state = adapter_state(model_bundle(_config("float32")).model)
    return {k: v.to(torch.bfloat16).float() for k, v in state.items()}


def _one_round(
    dtype: str, evaluator: _Evaluator, tmp_path: Path
) -> tuple[dict[str, Any], State, InProcessGrid]:
    cfg = _config(dtype)
    strategy = build_strategy(cfg)
    grid = InProcessGrid(cfg)
    result = run_federation(
        grid,  # type: ignore[arg-type]
        cfg,
        strategy,
        evaluator,
        RunDir(tmp_path / dtype),
    )
    row = result.rows[1]
    assert row["clients"] == 2 and row["clients_dropped"] == 0, row["dropped"]
    return row, result.state, grid


@pytest.fixture(scope="module")
def rounds(
    start: State, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[dict[str, Any], State, InProcessGrid]]:
    mp = pytest.MonkeyPatch()  # flower_task_identity, at module scope
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        mp.setattr(TaskIdentity, attr, value)
    tmp = tmp_path_factory.mktemp("transport")
    # One evaluator (its base fingerprint taken once, as by one ServerApp): it
    # does not read federation.*, the only group in which the runs differ.
    evaluator = _Evaluator(_config("float32"), start)
    try:
        return {
            d: _one_round(d, evaluator, tmp) for d in ("float32", "bfloat16", "float16")
        }
    finally:
        mp.undo()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16bit_round_sends_at_most_052_of_the_float32_bytes(
    rounds: dict[str, tuple[dict[str, Any], State, InProcessGrid]], dtype: str
) -> None:
    wide, _, wide_grid = rounds["float32"]
    row, _, grid = rounds[dtype]
    for key in ("bytes_down", "bytes_up"):  # the server's counters (metrics.jsonl)
        assert 0 < row[key] <= 0.52 * wide[key], (key, row[key], wide[key])
    for part, (down, up) in grid.client_bytes.items():  # the clients' own metrics
        wide_down, wide_up = wide_grid.client_bytes[part]
        assert 0 < down <= 0.52 * wide_down and 0 < up <= 0.52 * wide_up


def test_a_bfloat16_round_aggregates_the_float32_round_within_bf16_rounding(
    rounds: dict[str, tuple[dict[str, Any], State, InProcessGrid]], start: State
) -> None:
    _, wide_global, wide = rounds["float32"]
    _, narrow_global, narrow = rounds["bfloat16"]
    weights = [1.0, 1.0]  # IID partitions of equal size
    for part in NODES.values():
        # downlink exact (start is bf16-representable): same training inputs
        assert all(torch.equal(narrow.received[part][k], start[k]) for k in start)
        # uplink: each tensor is torch's bf16 rounding of what float32 sent
        for key, value in wide.sent[part].items():
            assert torch.equal(narrow.sent[part][key], value.to(torch.bfloat16).float())
    trained = [wide.sent[p] for p in NODES.values()]
    assert any(not torch.equal(t[k], start[k]) for t in trained for k in start)
    # |sum p_i (bf16(y_i) - y_i)| <= u * sum p_i |y_i|, plus float32's own rounding
    scale = weighted_mean(
        [{k: v.abs() for k, v in t.items()} for t in trained], weights
    )
    for key, want in wide_global.items():
        bound = BF16_UNIT_ROUNDOFF * scale[key] + 2.0**-23 * want.abs() + 1e-30
        assert ((narrow_global[key] - want).abs() <= bound).all(), key
    assert any(not torch.equal(narrow_global[k], wide_global[k]) for k in start)
