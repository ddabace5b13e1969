"""A server without central evaluation holds no model: its base facts (fingerprint,
initial adapter, PEFT directory files) come from a child process and equal what the
model-holding evaluator computes in process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_config

from fedlora.lora.state import PROJECTION, factor_of
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
    child = BaseFactsOnly.from_child(cfg)
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
    child = BaseFactsOnly.from_child(cfg)
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
        BaseFactsOnly.from_child(cfg)
    assert "missing-model" in str(err.value)  # the child's own error


def test_the_launchers_precomputed_facts_serve_only_their_own_config(
    tmp_path: Path,
) -> None:
    """``start_precompute`` (launcher) -> ``precomputed_facts`` (ServerApp): the
    ServerApp waits for the child's lock and takes the facts only for the exact
    run config they were computed for."""
    from fedlora.config.flat import flatten_config
    from strategies.server.base_facts import (
        PRECOMPUTED,
        precomputed_facts,
        start_precompute,
        stop_precompute,
    )

    cfg = tiny_config("causal_lm", {"data.test_fraction": 0.0, "adapter.rank": 3})
    assert start_precompute(CASES["causal_lm"], tmp_path) is None  # evaluates
    child = start_precompute(cfg, tmp_path)
    assert child is not None
    facts = precomputed_facts(tmp_path, flatten_config(cfg))  # waits for the child
    assert child.poll() == 0
    assert facts is not None
    expected = BaseFactsOnly.from_child(cfg)
    assert facts.fingerprint == expected.facts.fingerprint
    assert all(
        torch.equal(facts.initial[k], v) for k, v in expected.facts.initial.items()
    )
    other = flatten_config(tiny_config("causal_lm", {"data.test_fraction": 0.0}))
    assert precomputed_facts(tmp_path, other) is None  # rank 4: not these facts
    stop_precompute(child, tmp_path)
    assert not (tmp_path / PRECOMPUTED).exists()
    assert precomputed_facts(tmp_path, flatten_config(cfg)) is None
