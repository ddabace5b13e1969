"""A server without central evaluation holds no model: its base facts (fingerprint,
initial adapter, PEFT directory files) come from a child process or, in a
simulation, from the clients, and equal what the model-holding evaluator computes
in process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_grid import ReplyingGrid
from flwr.app import Context, Error, Message, RecordDict
from safetensors.torch import load_file
from tiny_configs import tiny_config

from fedlora import protocol as proto
from fedlora.config.flat import flatten_config
from fedlora.lora.state import PROJECTION, factor_of
from strategies.config import ExperimentConfig
from strategies.server.base_facts import facts_from_clients
from strategies.server.evaluator import (
    BaseFactsOnly,
    CentralEvaluator,
    evaluates_centrally,
    server_model,
)

CASES = {
    # unequal d_in / d_out (q_proj 64 -> 64, up_proj 64 -> 128), odd rank
    "causal_lm": tiny_config(
        "causal_lm",
        {
            "data.num_examples": 120,
            "adapter.rank": 3,
            "adapter.target_modules": ("q_proj", "up_proj"),
        },
    ),
    # QDoRA: the magnitude (||W|| per row of the NF4 base) must match bit for bit
    "dora": tiny_config(
        "causal_lm",
        {"data.num_examples": 120, "adapter.rank": 3, "adapter.use_dora": True},
    ),
    # VeRA: the shared projections (seeded) and d_initial must match bit for bit
    "vera": tiny_config(
        "causal_lm",
        {
            "data.num_examples": 120,
            "adapter.rank": 3,
            "adapter.peft_type": "vera",
            "adapter.target_modules": ("q_proj", "up_proj"),
        },
    ),
    # PiSSA: the residual base and the principal factors; saved for the original base
    "pissa": tiny_config(
        "causal_lm",
        {
            "data.num_examples": 120,
            "adapter.rank": 3,
            "adapter.init": "pissa",
            "adapter.target_modules": ("q_proj", "up_proj"),
        },
    ),
    # a trained task head rides along with the LoRA factors
    "classification": tiny_config(
        "classification", {"data.num_examples": 120, "adapter.train_head": True}
    ),
}


def _config(raw: bytes) -> dict[str, object]:
    config = json.loads(raw)
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    return config


@pytest.mark.parametrize("task", sorted(CASES))
def test_child_facts_equal_the_in_process_model_and_save_the_same_directory(
    task: str, tmp_path: Path
) -> None:
    cfg = CASES[task]
    here = CentralEvaluator(cfg)
    child = BaseFactsOnly.compute(cfg)
    assert child.config()["base-fingerprint"] == here.config()["base-fingerprint"]
    initial, expected = child.initial_state(), here.initial_state()
    assert set(initial) == set(expected)
    assert all(torch.equal(initial[k], expected[k]) for k in expected)
    random = ("lora_A", PROJECTION)  # A, or VeRA's shared projections
    assert any(t.abs().sum() > 0 for k, t in initial.items() if factor_of(k) in random)
    if task == "classification":
        assert any("lora_" not in k for k in initial)  # the head
    if task == "dora":
        assert any(k.endswith("lora_magnitude_vector") for k in initial)
    if task == "pissa":
        assert all(t.abs().sum() > 0 for t in initial.values())  # B too
    if task == "vera":
        assert {factor_of(k) for k in initial} == {"lora_A", "lora_B", PROJECTION}
    # a trained-looking adapter, saved by both: the same files, byte for byte
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in expected.items()}
    here.save(state, tmp_path / "here")
    child.save(state, tmp_path / "child")
    names = sorted(p.name for p in (tmp_path / "here").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "child").iterdir())
    assert "adapter_config.json" in names
    for name in names:
        here_bytes = (tmp_path / "here" / name).read_bytes()
        child_bytes = (tmp_path / "child" / name).read_bytes()
        if name == "adapter_config.json":  # peft writes target_modules from a set
            here_bytes, child_bytes = _config(here_bytes), _config(child_bytes)
        assert here_bytes == child_bytes, name
    saved = load_file(str(tmp_path / "child" / "adapter_model.safetensors"))
    if task == "pissa":  # [B | -B0] [A; A0]: for the original base
        for k, v in state.items():
            r = v.shape[0] if k.endswith("lora_A.weight") else v.shape[1]
            start = saved[k][:r] if k.endswith("lora_A.weight") else saved[k][:, :r]
            rest = saved[k][r:] if k.endswith("lora_A.weight") else -saved[k][:, r:]
            assert torch.equal(start, v) and torch.equal(rest, initial[k])
    else:
        assert all(torch.equal(saved[k], state[k]) for k in state)
    assert set(child.fields(state).values()) == {None}  # no central evaluation


def test_peft_loads_the_model_free_adapter_directory(tmp_path: Path) -> None:
    from peft import PeftModel

    from fedlora.cache import model_bundle
    from fedlora.lora.state import adapter_state
    from fedlora.models import load_base_model

    cfg = CASES["causal_lm"]
    child = BaseFactsOnly.compute(cfg)
    state = {k: v + 0.5 for k, v in child.initial_state().items()}
    child.save(state, tmp_path / "adapter")
    base = load_base_model(cfg.model, task="causal_lm", num_labels=0, seed=cfg.seed)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    got = adapter_state(loaded)
    assert set(got) == set(state)
    assert all(torch.allclose(got[k], state[k]) for k in state)
    assert set(got) == set(adapter_state(model_bundle(cfg).model))


def test_the_server_holds_a_model_only_when_it_evaluates() -> None:
    assert evaluates_centrally(CASES["causal_lm"], server_can_evaluate=True)
    assert not evaluates_centrally(CASES["causal_lm"], server_can_evaluate=False)
    off = tiny_config("causal_lm", {"data.test_fraction": 0.0})
    assert not evaluates_centrally(off, server_can_evaluate=True)
    assert isinstance(server_model(off, True), BaseFactsOnly)
    assert isinstance(server_model(CASES["causal_lm"], True), CentralEvaluator)


def test_a_child_that_cannot_load_the_model_fails_with_its_error(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(
        "causal_lm",
        {"model.name": str(tmp_path / "missing-model")},
    )
    with pytest.raises(RuntimeError, match="loading the base model") as err:
        BaseFactsOnly.compute(cfg)
    assert "missing-model" in str(err.value)  # the child's own error


class ClientsGrid(ReplyingGrid):
    """Hands each message to the real ClientApp in this process, serialised both
    ways as Flower does; ``node_configs`` maps node id -> node-config."""

    def __init__(
        self, cfg: ExperimentConfig, node_configs: dict[int, dict[str, Any]]
    ) -> None:
        super().__init__()
        self.run_config = flatten_config(cfg)
        self.node_configs = node_configs
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_configs)

    def reply(self, msg: Message) -> Message:
        from fedlora.client.app import app as client_app

        node = msg.metadata.dst_node_id
        self.asked.append(node)
        context = Context(
            run_id=1,
            node_id=node,
            node_config=self.node_configs[node],
            state=RecordDict(),
            run_config=self.run_config,
        )
        arrived = Message(
            _wire(msg.content), dst_node_id=node, message_type=msg.metadata.message_type
        )
        return Message(_wire(client_app(arrived, context).content), reply_to=msg)


def _wire(content: RecordDict) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    return recorddict_from_proto(recorddict_to_proto(content))


def _nodes(cfg: ExperimentConfig) -> dict[int, dict[str, Any]]:
    """Three sites; the first (smallest id) trains at a lower rank than the run's."""
    low = {"partition-id": 0, "num-partitions": 3, "rank": cfg.adapter.rank - 1}
    return {
        7: low,
        11: {"partition-id": 1, "num-partitions": 3},
        13: {"partition-id": 2, "num-partitions": 3},
    }


@pytest.mark.usefixtures("flower_task_identity")
def test_simulated_clients_send_the_facts_a_child_computes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The clients' facts equal a fresh child's bit for bit, after this process
    trained on the cached model (the initial adapter is the copy taken at build),
    and for a site of another rank, which builds the run's model just to answer."""
    from fedlora.cache import model_bundle
    from fedlora.lora.state import load_adapter_state

    cfg = tiny_config(
        "causal_lm",
        {
            "data.test_fraction": 0.0,
            "adapter.rank": 3,
            "adapter.target_modules": ("q_proj", "up_proj"),
            "federation.clients": 3,
            "federation.fraction_train": 1.0,
        },
    )
    monkeypatch.setattr("os.cpu_count", lambda: 8)  # room for three actors
    child = BaseFactsOnly.compute(cfg).facts
    model = model_bundle(cfg).model  # as a client that trained before would hold it
    load_adapter_state(model, {k: v + 1.0 for k, v in child.initial.items()})
    grid = ClientsGrid(cfg, _nodes(cfg))
    facts = facts_from_clients(grid, cfg, timeout=60)  # type: ignore[arg-type]
    assert sorted(grid.asked) == [7, 11, 13]  # round 1 samples all three
    assert facts.fingerprint == child.fingerprint
    assert set(facts.initial) == set(child.initial)
    assert all(torch.equal(facts.initial[k], v) for k, v in child.initial.items())
    assert (
        set(facts.template)
        == set(child.template)
        == {
            "adapter_config.json",
            "README.md",
        }
    )
    config = _config(facts.template["adapter_config.json"].encode())
    assert config == _config(child.template["adapter_config.json"].encode())
    assert config["r"] == 3  # the run's rank, not the first site's


@pytest.mark.usefixtures("flower_task_identity")
def test_as_many_clients_are_asked_as_round_1_samples(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = tiny_config(
        "causal_lm",
        {
            "data.test_fraction": 0.0,
            "federation.clients": 3,
            "federation.fraction_train": 0.5,
            "federation.min_clients": 2,
        },
    )
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    grid = ClientsGrid(cfg, _nodes(cfg))
    facts_from_clients(grid, cfg, timeout=60)  # type: ignore[arg-type]
    assert sorted(grid.asked) == [7, 11]  # max(min_clients, int(3 x 0.5)) = 2
    monkeypatch.setattr("os.cpu_count", lambda: 1)  # one actor at most here
    grid = ClientsGrid(cfg, _nodes(cfg))
    facts_from_clients(grid, cfg, timeout=60)  # type: ignore[arg-type]
    assert grid.asked == [7]


class _Altered(ClientsGrid):
    """Node 13 answers with another fingerprint; node 11 fails."""

    def __init__(self, cfg: ExperimentConfig, fail: bool) -> None:
        super().__init__(cfg, _nodes(cfg))
        self.fail = fail

    def reply(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        if self.fail and node == 11:
            return Message(
                Error(code=0, reason="no space left on device"), reply_to=msg
            )
        reply = super().reply(msg)
        if node == 13:
            reply.content.config_records[proto.BASE_FACTS][proto.BASE_FINGERPRINT] = (
                "0" * 16
            )
        return reply


@pytest.mark.usefixtures("flower_task_identity")
def test_clients_with_another_model_than_the_servers_stop_it() -> None:
    """A server that evaluates asks the clients too (they load their model while
    it loads its own) and refuses one whose fingerprint is not its own."""
    from strategies.server.base_facts import ask_clients, clients_answer

    cfg = tiny_config("causal_lm", {"federation.clients": 3})
    own = CentralEvaluator(cfg).fingerprint
    grid = ClientsGrid(cfg, _nodes(cfg))
    answer = clients_answer(grid, ask_clients(grid, cfg), 60, own=own)  # type: ignore[arg-type]
    assert answer.fingerprint == own
    with pytest.raises(RuntimeError, match="another base model than the server's"):
        clients_answer(grid, ask_clients(grid, cfg), 60, own="0" * 16)  # type: ignore[arg-type]


@pytest.mark.parametrize("fail", [False, True])
@pytest.mark.usefixtures("flower_task_identity")
def test_clients_that_disagree_or_fail_stop_the_server_with_the_reason(
    fail: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)  # all three nodes are asked
    cfg = tiny_config(
        "causal_lm",
        {"data.test_fraction": 0.0, "federation.clients": 3},
    )
    grid = _Altered(cfg, fail)
    expected = r"node 11\).*no space left on device" if fail else "node 7 and node 13"
    with pytest.raises(RuntimeError, match=expected):
        facts_from_clients(grid, cfg, timeout=60)  # type: ignore[arg-type]
