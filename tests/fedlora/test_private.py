"""privacy=dp at the client-round level: equivalences, accounting, budget, restart."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_dp_values

from fedlora.cache import collator, model_bundle, partition_dataset
from fedlora.client.private_round import (
    dp_settings,
    ledger_path,
    load_ledger,
    planned_steps,
)
from fedlora.client.round import train_round
from fedlora.client.site import SiteConfig
from fedlora.config.flat import build_config
from fedlora.dp import PrivacyLedger, per_sample_loss, poisson_batch
from fedlora.lora.state import adapter_state, factor_of, load_adapter_state
from fedlora.train import derive_seed
from strategies.config import ExperimentConfig

BASE = tiny_dp_values()


def _cfg(**extra: object) -> ExperimentConfig:
    return build_config(ExperimentConfig, {**BASE, **extra})


@pytest.mark.parametrize("peft_type", ["lora", "vera"])
def test_zero_noise_infinite_clip_equals_the_non_private_steps(peft_type: str) -> None:
    """DP(sigma=0, C=inf) = AdamW on sum of per-example losses / b, same batches
    (VeRA: its vectors' per-sample rule, fedlora.dp.vera, in the round users run)."""
    cfg = _cfg(
        **{
            "privacy.noise_multiplier": 0.0,
            "privacy.max_grad_norm": 1e9,
            "adapter.peft_type": peft_type,
            "adapter.lr_ratio_b": 4.0,  # LoRA+: B (VeRA's lambda_b) at 4x the rate
        }
    )
    site = SiteConfig(0, 2)
    bundle = model_bundle(cfg)
    start = adapter_state(bundle.model)
    out = train_round(cfg, site, 1, start, ledger=PrivacyLedger("rdp", 1e-5))

    model = bundle.model
    load_adapter_state(model, start)
    data = partition_dataset(cfg, 0, 2)
    settings = dp_settings(cfg, len(data))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in trainable if "modules_to_save" in n]
    b = [p for n, p in trainable if "lora_B" in n or "vera_lambda_b" in n]
    a = [p for n, p in trainable if "lora_A" in n or "vera_lambda_d" in n]
    assert head and a and b and len(head) + len(a) + len(b) == len(trainable)
    opt = torch.optim.AdamW(  # B and the head at their configured ratios
        [
            {"params": a, "lr": cfg.train.lr},
            {"params": b, "lr": cfg.train.lr * cfg.adapter.lr_ratio_b},
            {"params": head, "lr": cfg.train.lr * cfg.adapter.lr_ratio_head},
        ],
        weight_decay=cfg.train.weight_decay,
    )
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, 1, 0, "poisson"))
    collate = collator(cfg)
    model.train()
    for _ in range(cfg.federation.local_steps):
        idx = poisson_batch(len(data), settings.sample_rate, gen)
        batch = collate([data[int(i)] for i in idx])
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss = per_sample_loss(logits, labels, task="classification").sum()
        (loss / settings.expected_batch_size).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    reference = adapter_state(model)
    bad = [
        k
        for k in out.state
        # float32: Adam normalises tiny A gradients (B starts at 0), so the order in
        # which per-sample gradients are summed shows after a few steps, up to 8e-6
        # in a fresh-clone run; a different batch, clip or noise moves an entry by
        # about one step, lr = 2e-3, far above this tolerance.
        if not torch.allclose(out.state[k], reference[k], rtol=1e-5, atol=5e-5)
    ]
    errs = [float((out.state[k] - reference[k]).abs().max()) for k in bad]
    assert not bad, f"{len(bad)} tensors differ: {bad[:3]} {errs[:3]}"


def test_reported_epsilon_matches_an_independent_recomputation() -> None:
    cfg = _cfg(**{"privacy.epsilon": 3.0})
    ledger = PrivacyLedger("rdp", 1e-5)
    start = adapter_state(model_bundle(cfg).model)
    out = train_round(cfg, SiteConfig(0, 2), 1, start, ledger=ledger)
    assert out.privacy is not None
    p = out.privacy
    fresh = PrivacyLedger("rdp", 1e-5)
    fresh.step(p.noise_multiplier, p.sample_rate, n=p.steps)
    assert p.steps == cfg.federation.local_steps
    assert p.epsilon == pytest.approx(fresh.epsilon(), rel=0.01)
    # sigma was calibrated for the whole planned run, not one round
    full = PrivacyLedger("rdp", 1e-5)
    full.step(p.noise_multiplier, p.sample_rate, n=planned_steps(cfg))
    assert 0.95 * 3.0 <= full.epsilon() <= 3.0


def test_epsilon_grows_across_rounds_and_survives_a_restart(tmp_path: Path) -> None:
    cfg = _cfg(**{"privacy.epsilon": 3.0})
    site = SiteConfig(1, 2, state_dir=str(tmp_path))
    path = ledger_path(cfg, site, "")
    assert path == tmp_path / "partition-1" / "dp-ledger.json"
    start = adapter_state(model_bundle(cfg).model)
    epsilons = []
    for rnd in (1, 2):
        ledger = load_ledger(cfg, path)  # a fresh process every round
        out = train_round(cfg, site, rnd, start, ledger=ledger)
        ledger.save(path)
        assert out.privacy is not None
        epsilons.append(out.privacy.epsilon)
    assert 0 < epsilons[0] < epsilons[1]
    assert load_ledger(cfg, path).steps == 2 * cfg.federation.local_steps


def test_an_exhausted_budget_stops_the_client() -> None:
    """sigma covers the planned 3 rounds; a 4th round would exceed epsilon."""
    cfg = _cfg(**{"privacy.epsilon": 2.0})
    ledger = PrivacyLedger("rdp", 1e-5)
    start = adapter_state(model_bundle(cfg).model)
    for rnd in (1, 2, 3):
        out = train_round(cfg, SiteConfig(0, 2), rnd, start, ledger=ledger)
        assert out.privacy is not None and not out.privacy.exhausted
    spent = ledger.epsilon()
    assert spent <= 2.0
    out = train_round(cfg, SiteConfig(0, 2), 4, start, ledger=ledger)
    assert out.privacy is not None and out.privacy.exhausted
    assert out.state == {} and out.result.steps == 0
    assert ledger.epsilon() == spent  # nothing more was spent


def test_ffa_under_dp_noises_and_sends_only_b() -> None:
    cfg = _cfg(
        **{
            "privacy.epsilon": 3.0,
            "adapter.variant": "ffa",
            "adapter.train_head": False,
        }
    )
    start = adapter_state(model_bundle(cfg).model)
    sent = {k: v for k, v in start.items() if factor_of(k) == "lora_B"}
    out = train_round(cfg, SiteConfig(0, 2), 1, sent, ledger=PrivacyLedger("rdp", 1e-5))
    assert {factor_of(k) for k in out.state} == {"lora_B"}
    assert all(not torch.equal(out.state[k], sent[k]) for k in sent)


@pytest.mark.parametrize("init", ["pissa", "loftq"])
def test_svd_initialisations_train_under_dp(init: str) -> None:
    """PiSSA and LoftQ change only where A and B start: DP-SGD trains them as it
    trains LoRA (here FFA: the SVD's A frozen, B noised and sent)."""
    cfg = _cfg(
        **{
            "privacy.epsilon": 3.0,
            "adapter.init": init,
            "adapter.variant": "ffa",
            "adapter.train_head": False,
        }
    )
    start = adapter_state(model_bundle(cfg).model)
    assert all(v.abs().sum() > 0 for v in start.values())  # B is not zero
    sent = {k: v for k, v in start.items() if factor_of(k) == "lora_B"}
    ledger = PrivacyLedger("rdp", 1e-5)
    out = train_round(cfg, SiteConfig(0, 2), 1, sent, ledger=ledger)
    assert ledger.steps == cfg.federation.local_steps
    assert set(out.state) == set(sent)
    assert all(not torch.equal(out.state[k], sent[k]) for k in sent)


@pytest.mark.parametrize("variant", ["la_lora", "rolora"])
def test_alternating_variants_train_under_dp(variant: str) -> None:
    cfg = _cfg(**{"privacy.epsilon": 3.0, "adapter.variant": variant})
    start = adapter_state(model_bundle(cfg).model)
    ledger = PrivacyLedger("rdp", 1e-5)
    out = train_round(cfg, SiteConfig(0, 2), 2, start, ledger=ledger)
    assert ledger.steps == cfg.federation.local_steps
    moved = {factor_of(k) for k in out.state if not torch.equal(out.state[k], start[k])}
    assert moved == ({"lora_A", "lora_B"} if variant == "la_lora" else {"lora_A"}) | {
        None
    }


def test_la_lora_under_dp_starts_round_2_with_b_after_an_odd_round() -> None:
    """K = 1: the round's only step trains B in every round (not A in even rounds)."""
    cfg = _cfg(
        **{
            "privacy.epsilon": 3.0,
            "adapter.variant": "la_lora",
            "adapter.train_head": False,
            "federation.local_steps": 1,
        }
    )
    start = adapter_state(model_bundle(cfg).model)
    out = train_round(
        cfg, SiteConfig(0, 2), 2, start, ledger=PrivacyLedger("rdp", 1e-5)
    )
    moved = {factor_of(k) for k in out.state if not torch.equal(out.state[k], start[k])}
    assert moved == {"lora_B"}


def test_dp_needs_a_ledger() -> None:
    cfg = _cfg(**{"privacy.epsilon": 3.0})
    start = adapter_state(model_bundle(cfg).model)
    with pytest.raises(ValueError, match="PrivacyLedger"):
        train_round(cfg, SiteConfig(0, 2), 1, start)
    with pytest.raises(ValueError, match="does not match"):
        load_ledger(
            dataclasses.replace(
                cfg, privacy=dataclasses.replace(cfg.privacy, accountant="prv")
            ),
            Path("/nonexistent"),
            PrivacyLedger("rdp", 1e-5).to_json(),
        )
