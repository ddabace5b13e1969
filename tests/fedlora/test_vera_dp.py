"""VeRA under DP-SGD: per-sample gradients of the scaling vectors, and DP rounds.

peft keeps VeRA's ``lambda_b`` / ``lambda_d`` in ParameterDicts; Opacus' hooks
alone never see them. fedlora hooks the VeRA layer with an exact rule
(:mod:`fedlora.dp.vera`); these tests hold it against each example's gradient
computed alone, on an NF4 base with sliced projections, and run the DP round as
users run it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_configs import tiny_dp_values
from torch import Tensor, nn

from fedlora.cache import model_bundle
from fedlora.client.round import train_round
from fedlora.client.site import SiteConfig
from fedlora.config import AdapterConfig, ModelConfig
from fedlora.config.flat import build_config
from fedlora.data.tokenize import Collator
from fedlora.dp import PrivacyLedger, check_opacus_compatible, per_sample_loss
from fedlora.lora.state import (
    VERA_B,
    VERA_D,
    adapter_state,
    factor_of,
    num_params,
    select,
)
from fedlora.lora.variants import VARIANTS
from strategies.config import ExperimentConfig

TINY = ModelConfig(name="tiny_llama", tiny_hidden_size=64, tiny_layers=2)
# q_proj 64 -> 64 and up_proj 64 -> 128: the shared B is sliced for q_proj
VERA = AdapterConfig(peft_type="vera", rank=6, target_modules=("q_proj", "up_proj"))
NUM_LABELS = 3
TASKS = ("classification", "causal_lm")


def _model(task: str, quantization: str = "nf4", **adapter: object) -> nn.Module:
    """Tiny Llama + VeRA with random non-zero lambda_b (peft starts it at 0,
    which would leave every lambda_d gradient 0)."""
    from fedlora.models import load_base_model, wrap_lora

    cfg = replace(TINY, quantization=quantization)
    base = load_base_model(cfg, task=task, num_labels=NUM_LABELS, seed=0)
    model = wrap_lora(base, cfg, replace(VERA, **adapter), task=task, seed=0)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if VERA_B in name or VERA_D in name:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    model.train()
    return model


def _items(task: str) -> list[dict[str, Tensor]]:
    """Four examples of different lengths (the batch is padded)."""
    g = torch.Generator().manual_seed(2)
    items = []
    for i, n in enumerate((12, 7, 10, 5)):
        ids = torch.randint(1000, 2000, (n,), generator=g)
        labels = torch.tensor(i % NUM_LABELS) if task == "classification" else ids
        items.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        )
    return items


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.bnb
@pytest.mark.parametrize("task", TASKS)
def test_vera_per_sample_grads_on_nf4_equal_a_loop_over_examples(task: str) -> None:
    from fedlora.dp.compat import grad_sample_module_cls

    model = _model(task)
    collate = Collator(pad_id=0, task=task)
    items = _items(task)
    want = []
    for item in items:  # reference: each example alone, HF's own loss
        model.zero_grad(set_to_none=True)
        model(**collate([item])).loss.backward()
        want.append({n: p.grad.clone() for n, p in _trainable(model).items()})
    model.zero_grad(set_to_none=True)

    gsm = grad_sample_module_cls()(model, loss_reduction="sum")
    batch = collate(items)
    labels = batch.pop("labels")
    per_sample_loss(gsm(**batch).logits, labels, task=task).sum().backward()
    params = _trainable(model)
    vectors = [n for n in params if VERA_B in n or VERA_D in n]
    assert len(vectors) == 2 * 2 * 2  # 2 layers x (q, up) x (lambda_b, lambda_d)
    bad = []
    for i in range(len(items)):
        for name, p in params.items():
            got, ref = p.grad_sample[i], want[i][name]
            assert float(ref.abs().max()) > 0, name  # a gradient that can be wrong
            if not torch.allclose(got, ref, rtol=1e-4, atol=1e-6):
                bad.append(f"example {i} {name}: {float((got - ref).abs().max()):.3g}")
    gsm.to_standard_module()
    assert not bad, "per-sample gradients differ:\n" + "\n".join(bad)


def test_frozen_lambda_d_gets_no_per_sample_gradient() -> None:
    """A step that trains lambda_b alone (LA-LoRA, RoLoRA freeze lambda_d after
    the model is wrapped): the rule fills only what trains."""
    from fedlora.dp.compat import grad_sample_module_cls

    model = _model("causal_lm", "none")
    gsm = grad_sample_module_cls()(model, loss_reduction="sum")
    for name, p in model.named_parameters():
        if VERA_D in name:
            p.requires_grad_(False)
    batch = Collator(pad_id=0, task="causal_lm")(_items("causal_lm"))
    labels = batch.pop("labels")
    per_sample_loss(gsm(**batch).logits, labels, task="causal_lm").sum().backward()
    for name, p in model.named_parameters():
        if VERA_B in name:
            assert p.grad_sample.shape == (4, *p.shape), name
        if VERA_D in name:
            assert getattr(p, "grad_sample", None) is None, name
    gsm.to_standard_module()


def test_check_names_what_the_vera_rule_cannot_serve() -> None:
    check_opacus_compatible(_model("classification", "none"))  # hooks: accepted
    with pytest.raises(ValueError, match="hooks' only"):
        check_opacus_compatible(
            _model("causal_lm", "none"), grad_sample_mode="functorch"
        )
    with pytest.raises(ValueError, match="adapter.dropout=0"):
        check_opacus_compatible(_model("causal_lm", "none", dropout=0.1))
    model = _model("causal_lm", "none")
    for name, p in model.named_parameters():
        if "q_proj.base_layer.weight" in name:
            p.requires_grad_(True)  # the rule would not cover it: refused
    with pytest.raises(ValueError, match="base_layer.weight"):
        check_opacus_compatible(model)


BASE = tiny_dp_values(
    {"privacy.epsilon": 3.0, "adapter.peft_type": "vera", "adapter.rank": 16}
)


def _cfg(**extra: object) -> ExperimentConfig:
    return build_config(ExperimentConfig, {**BASE, **extra})


@pytest.mark.parametrize("variant", ["lora", "ffa", "la_lora", "rolora"])
def test_a_dp_vera_round_noises_and_sends_only_the_vectors(variant: str) -> None:
    """The round users run: every returned vector moved, the ledger counts the
    round's steps, and only the round's vectors are noised and sent."""
    cfg = _cfg(**{"adapter.variant": variant, "adapter.train_head": False})
    rule = VARIANTS.get(variant)
    start = adapter_state(model_bundle(cfg).model)
    sent = select(start, rule.sends_down(1))
    ledger = PrivacyLedger("rdp", 1e-5)
    out = train_round(cfg, SiteConfig(0, 2), 1, sent, ledger=ledger)
    assert ledger.steps == cfg.federation.local_steps
    assert out.privacy is not None and out.privacy.epsilon > 0
    trained = rule.factors_for_round(1)
    assert {factor_of(k) for k in out.state} == set(trained)
    assert all(not torch.equal(out.state[k], sent[k]) for k in out.state)
    assert all(torch.isfinite(v).all() for v in out.state.values())
    # per matrix (2 layers x q, v): lambda_b (d_out 64) as B, lambda_d (r 16) as A
    per_matrix = 64 * ("lora_B" in trained) + 16 * ("lora_A" in trained)
    assert num_params(out.state) == 4 * per_matrix
    # the next round wraps the same cached model again (RoLoRA: now lambda_d)
    again = train_round(cfg, SiteConfig(0, 2), 2, {**sent, **out.state}, ledger=ledger)
    assert ledger.steps == 2 * cfg.federation.local_steps
    assert {factor_of(k) for k in again.state} == set(rule.factors_for_round(2))
