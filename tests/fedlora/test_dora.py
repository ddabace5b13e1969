"""DoRA / QDoRA in federation: what is trained and sent, what the server merges,
and how far that merge is from the mean of the clients' DoRA weights.

A client's adapted matrix is ``W'_i = m_i * (W + s B_i A_i) / ||W + s B_i A_i||``
(norm of each output row). FedAvg averages A, B and m separately; the merged
``W'`` is not the mean of the ``W'_i`` (the row norm is not linear), and the tests
measure that gap against a float64 reference computed here from the dequantised
NF4 base.
"""

from __future__ import annotations

import pytest
import torch
from replies import adapter_reply
from tiny_configs import tiny_config

from fedlora.cache import model_bundle
from fedlora.client.round import train_round
from fedlora.client.site import SiteConfig
from fedlora.config.flat import ConfigError
from fedlora.lora.state import (
    A_SUFFIX,
    B_SUFFIX,
    MAGNITUDE,
    adapter_state,
    factor_of,
    fingerprint,
    from_record,
    select,
)
from fedlora.lora.variants import VARIANTS
from strategies.fedavg_lora import FedAvgLora

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CLIENTS = 3


def _cfg(variant: str = "lora", **extra: object):  # type: ignore[no-untyped-def]
    return tiny_config(
        "causal_lm",
        {
            "data.num_examples": 300,
            "adapter.use_dora": True,
            "adapter.variant": variant,
            "adapter.rank": 3,
            "adapter.target_modules": ("q_proj", "up_proj"),  # 64->64, 64->128
            "federation.clients": CLIENTS,
            "federation.local_steps": 5,
            "train.batch_size": 4,
            "train.lr": 2e-2,
            **extra,
        },
    )


def _train(variant: str, start: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    cfg = _cfg(variant)
    sent = select(start, VARIANTS.get(variant).sends_down(1))
    kept = [k for k in start if k not in sent]
    fp = fingerprint(start, kept) if kept else ""
    return [
        train_round(cfg, SiteConfig(i, CLIENTS), 1, sent, fp) for i in range(CLIENTS)
    ]


def _dora_weight(
    w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, m: torch.Tensor, s: float
) -> torch.Tensor:
    """``m * (W + s B A) / ||W + s B A||`` per output row, in float64."""
    v = w.double() + s * (b.double() @ a.double())
    return (m.double() / v.norm(dim=1))[:, None] * v


def _state_weight(
    state: dict[str, torch.Tensor], name: str, w: torch.Tensor, s: float
) -> torch.Tensor:
    """The DoRA weight of matrix ``name`` of an adapter state, in float64."""
    b, a = state[name + B_SUFFIX], state[name + A_SUFFIX]
    return _dora_weight(w, b, a, state[f"{name}.{MAGNITUDE}"], s)


def _layers(model):  # type: ignore[no-untyped-def]
    """State-key prefix -> (peft LoRA layer, dequantised base W (d_out, d_in), s)."""
    from peft.utils.integrations import dequantize_module_weight

    out = {}
    for key in adapter_state(model):
        if key.endswith(A_SUFFIX):
            name = key[: -len(A_SUFFIX)]
            layer = model.get_submodule(name)
            w = dequantize_module_weight(layer.base_layer).float()
            out[name] = (layer, w, float(layer.scaling["default"]))
    return out


def test_the_reference_dora_weight_is_what_peft_computes_on_the_nf4_base() -> None:
    """The float64 reference used below is the layer's own forward."""
    model = model_bundle(_cfg()).model
    g = torch.Generator().manual_seed(0)
    for layer, w, s in _layers(model).values():
        a = layer.lora_A["default"].weight.detach()
        b = torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.1
        m = layer.lora_magnitude_vector["default"].weight.detach()
        assert m.shape == (w.shape[0],)
        assert torch.allclose(m.double(), w.double().norm(dim=1), rtol=1e-5)
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(b)
            x = torch.randn(5, w.shape[1], generator=g)
            got = layer(x).double()
            layer.lora_B["default"].weight.zero_()
        want = x.double() @ _dora_weight(w, b, a, m, s).T
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_dora_clients_send_a_b_and_m_and_the_server_merges_each_as_the_mean() -> None:
    """FedAvg's merge of real DoRA replies equals the float64 weighted mean of
    every tensor; the merged W' is not the mean of the clients' W' (measured)."""
    model = model_bundle(_cfg()).model
    start = adapter_state(model)
    mags = [k for k in start if k.endswith(MAGNITUDE)]
    assert len(mags) == 4 and all(factor_of(k) == "lora_B" for k in mags)
    outs = _train("lora", start)
    for out in outs:
        assert set(out.state) == set(start)
        assert any(not torch.equal(out.state[k], start[k]) for k in mags)
    weights = [o.num_examples for o in outs]
    strategy = FedAvgLora.from_config(_cfg())
    strategy.global_state = start
    merged_record, _ = strategy.aggregate_train(
        1,
        [
            adapter_reply(i + 1, o.state, n)
            for i, (o, n) in enumerate(zip(outs, weights, strict=True))
        ],
    )
    assert merged_record is not None
    merged = from_record(merged_record)
    total = float(sum(weights))
    for key in start:
        reference = sum(
            w * o.state[key].double() for w, o in zip(weights, outs, strict=True)
        )
        assert torch.allclose(merged[key].double(), reference / total, atol=1e-6)
    gaps = []
    for name, (_, w, s) in _layers(model).items():
        ideal = (
            sum(
                wt * _state_weight(o.state, name, w, s)
                for wt, o in zip(weights, outs, strict=True)
            )
            / total
        )
        update = (ideal - w.double()).norm()
        gaps.append(float((_state_weight(merged, name, w, s) - ideal).norm() / update))
    assert all(gap > 0 for gap in gaps), gaps  # not exact (benchmarks/family_merge.py)


def test_ffa_with_dora_trains_b_and_the_magnitude_only() -> None:
    start = adapter_state(model_bundle(_cfg("ffa")).model)
    for out in _train("ffa", start):
        assert {factor_of(k) for k in out.state} == {"lora_B"}
        assert any(k.endswith(MAGNITUDE) for k in out.state)
        assert not any(k.endswith(A_SUFFIX) for k in out.state)


@pytest.mark.parametrize("variant", ["rolora", "la_lora"])
def test_the_magnitude_moves_with_b_in_the_alternating_variants(variant: str) -> None:
    """RoLoRA round 1 trains and sends B (and m); LA-LoRA alternates per step and
    its low-pass filter, made for the factor matrices, leaves m's gradient as is."""
    start = adapter_state(model_bundle(_cfg(variant)).model)
    for out in _train(variant, start):
        mags = [k for k in out.state if k.endswith(MAGNITUDE)]
        assert len(mags) == 4
        assert all(not torch.equal(out.state[k], start[k]) for k in mags)
        assert all(torch.isfinite(v).all() for v in out.state.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy.mode": "dp", "privacy.noise_multiplier": 1.0}, "per-sample"),
        ({"strategy.name": "hetlora"}, "strategy=fedavg"),
        ({"strategy.name": "flexlora"}, "strategy=fedavg"),
    ],
)
def test_dora_refuses_what_it_cannot_do_and_names_what_works(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(**overrides)
    assert "use_dora" in str(err.value)


def test_the_magnitude_learns_at_a_s_rate_and_b_at_lr_ratio_b() -> None:
    from fedlora.config import TrainConfig
    from fedlora.train import trainable_groups

    model = model_bundle(_cfg()).model
    groups = trainable_groups(model, TrainConfig(lr=1.0), lr_ratio_b=16.0)
    by_name = {n: g["base_lr"] for g in groups for n in g["names"]}
    for name, lr in by_name.items():
        expected = 16.0 if ".lora_B." in name else 1.0
        assert lr == expected, name
    assert any(MAGNITUDE in n for n in by_name)
