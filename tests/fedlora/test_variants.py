"""Adapter variants: schedules, what travels, and exactness of the aggregation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_configs import tiny_config

from fedlora.cache import model_bundle
from fedlora.client.round import train_round
from fedlora.client.site import SiteConfig
from fedlora.lora.state import adapter_state, factor_of, fingerprint
from fedlora.lora.variants import VARIANTS
from strategies.aggregation import weighted_mean
from strategies.config import ExperimentConfig

A, B = frozenset({"lora_A"}), frozenset({"lora_B"})
AB = A | B


def _cfg(variant: str) -> ExperimentConfig:
    return tiny_config(
        "causal_lm",
        {
            "data.num_examples": 300,
            "adapter.variant": variant,
            "federation.clients": 3,
            "federation.local_steps": 3,
            "train.batch_size": 4,
        },
    )


# (variant, rounds 1-4 trained, rounds 1-4 sent down, global steps 1-4 or None)
SCHEDULES = [
    ("lora", [AB] * 4, [AB] * 4, None),
    ("ffa", [B] * 4, [B] * 4, None),
    ("rolora", [B, A, B, A], [AB] * 4, None),
    ("la_lora", [AB] * 4, [AB] * 4, [B, A, B, A]),
]
# ("la_lora" steps are the local steps of a round, 1-based: B first in every round)


@pytest.mark.parametrize(("name", "trained", "down", "steps"), SCHEDULES)
def test_schedules_match_the_spec(name, trained, down, steps) -> None:  # type: ignore[no-untyped-def]
    variant = VARIANTS.get(name)
    assert [variant.factors_for_round(r) for r in range(1, 5)] == trained
    assert [variant.sends_down(r) for r in range(1, 5)] == down
    if steps is None:
        assert variant.factors_for_step is None
    else:
        assert variant.factors_for_step is not None
        assert [variant.factors_for_step(g) for g in range(1, 5)] == steps


def _rounds(variant: str, server_round: int, start: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    cfg = _cfg(variant)
    sent = {
        k: v
        for k, v in start.items()
        if factor_of(k) in VARIANTS.get(variant).sends_down(server_round)
    }
    kept = [k for k in start if k not in sent]
    fp = fingerprint(start, kept) if kept else ""
    return [
        train_round(cfg, SiteConfig(i, 3), server_round, sent, fp) for i in range(3)
    ]


def _pairs(state: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    return [
        (k, k.replace("lora_A", "lora_B")) for k in state if factor_of(k) == "lora_A"
    ]


def test_ffa_sends_only_b_and_averaging_b_is_exact() -> None:
    """mean_i(B_i) A == mean_i(B_i A) in float64: A is frozen and identical."""
    start = adapter_state(model_bundle(_cfg("ffa")).model)
    outs = _rounds("ffa", 1, start)
    for out in outs:
        assert {factor_of(k) for k in out.state} == {"lora_B"}
    weights = [o.num_examples for o in outs]
    mean_b = weighted_mean([o.state for o in outs], weights)
    local_a = adapter_state(model_bundle(_cfg("ffa")).model)
    bad = []
    for ka, kb in _pairs(start):
        assert torch.equal(local_a[ka], start[ka]), "FFA changed A"
        a = start[ka].double()
        exact = sum(
            w * (o.state[kb].double() @ a) for w, o in zip(weights, outs, strict=True)
        )
        exact = exact / sum(weights)
        if not torch.allclose(mean_b[kb].double() @ a, exact, rtol=1e-6, atol=1e-9):
            bad.append(kb)
    assert not bad, bad


def test_rolora_even_round_trains_a_against_the_shared_b() -> None:
    """Round 2 trains A only; B A_i averaged = B times the mean of the A_i."""
    cfg = _cfg("rolora")
    start = adapter_state(model_bundle(cfg).model)
    g = torch.Generator().manual_seed(0)
    start = {
        k: (torch.randn(v.shape, generator=g) * 0.05 if factor_of(k) == "lora_B" else v)
        for k, v in start.items()
    }  # a B learnt in round 1
    outs = _rounds("rolora", 2, start)
    for out in outs:
        assert {factor_of(k) for k in out.state} == {"lora_A"}
    weights = [o.num_examples for o in outs]
    mean_a = weighted_mean([o.state for o in outs], weights)
    for ka, kb in _pairs(start):
        b = start[kb].double()
        exact = sum(
            w * (b @ o.state[ka].double()) for w, o in zip(weights, outs, strict=True)
        )
        assert torch.allclose(
            b @ mean_a[ka].double(), exact / sum(weights), rtol=1e-6, atol=1e-9
        )
        assert not torch.equal(mean_a[ka], start[ka])


def test_la_lora_first_step_moves_only_b() -> None:
    cfg = dataclasses.replace(
        _cfg("la_lora"),
        federation=dataclasses.replace(_cfg("la_lora").federation, local_steps=1),
    )
    start = adapter_state(model_bundle(cfg).model)
    out = train_round(cfg, SiteConfig(0, 3), 1, start)
    moved = {factor_of(k) for k in start if not torch.equal(out.state[k], start[k])}
    assert moved == {"lora_B"}
    out2 = train_round(
        dataclasses.replace(
            cfg, federation=dataclasses.replace(cfg.federation, local_steps=2)
        ),
        SiteConfig(0, 3),
        1,
        start,
    )
    moved2 = {factor_of(k) for k in start if not torch.equal(out2.state[k], start[k])}
    assert moved2 == {"lora_A", "lora_B"}


@pytest.mark.parametrize("server_round", [2, 3])
def test_la_lora_starts_every_round_with_b_under_an_odd_step_count(
    server_round: int,
) -> None:
    """With an odd K (here 1) later rounds must not start with A (paper: B on odd k)."""
    base = _cfg("la_lora")
    cfg = dataclasses.replace(
        base, federation=dataclasses.replace(base.federation, local_steps=1)
    )
    start = adapter_state(model_bundle(cfg).model)
    out = train_round(cfg, SiteConfig(0, 3), server_round, start)
    moved = {factor_of(k) for k in start if not torch.equal(out.state[k], start[k])}
    assert moved == {"lora_B"}


def test_mismatched_frozen_tensors_refuse_to_train() -> None:
    cfg = _cfg("ffa")
    start = adapter_state(model_bundle(cfg).model)
    sent = {k: v for k, v in start.items() if factor_of(k) == "lora_B"}
    with pytest.raises(RuntimeError, match="differ from the server"):
        train_round(cfg, SiteConfig(0, 3), 1, sent, "0" * 64)
