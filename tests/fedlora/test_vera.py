"""VeRA / QVeRA in federation: what is trained and sent, what the server merges,
and how far that merge is from the mean of the clients' VeRA updates.

A client's update of one matrix is ``diag(lambda_b) B diag(lambda_d) A`` with the
shared projections sliced to the matrix (``A[:, :d_in]``, ``B[:d_out, :]``).
FedAvg averages ``lambda_b`` and ``lambda_d`` separately; their product is not
the mean of the products, so plain VeRA's merge is not exact (measured here
against a float64 reference). With FFA-LoRA only ``lambda_b`` trains, the update is
linear in it, and the merge is exact.
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
    PROJECTION,
    VERA_B,
    VERA_D,
    adapter_state,
    factor_of,
    fingerprint,
    from_record,
    num_params,
    select,
)
from fedlora.lora.variants import VARIANTS
from strategies.fedavg_lora import FedAvgLora

pytestmark = pytest.mark.usefixtures("flower_task_identity")

CLIENTS = 3
RANK = 3
TARGETS = ("q_proj", "up_proj")  # 64 -> 64 and 64 -> 128: B is sliced for q_proj


def _cfg(variant: str = "lora", **extra: object):  # type: ignore[no-untyped-def]
    return tiny_config(
        "causal_lm",
        {
            "data.num_examples": 300,
            "adapter.peft_type": "vera",
            "adapter.variant": variant,
            "adapter.rank": RANK,
            "adapter.target_modules": TARGETS,
            "federation.clients": CLIENTS,
            "federation.local_steps": 5,
            "train.batch_size": 4,
            "train.lr": 5e-2,
            **extra,
        },
    )


def _train(variant: str, start: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    """One round at every client, sent and checked as the server does it."""
    cfg = _cfg(variant)
    sent = select(start, VARIANTS.get(variant).sends_down(1))
    kept = [k for k in start if k not in sent]
    return [
        train_round(cfg, SiteConfig(i, CLIENTS), 1, sent, fingerprint(start, kept))
        for i in range(CLIENTS)
    ]


def _matrices(model):  # type: ignore[no-untyped-def]
    """State-key prefix -> (peft VeRA layer, dequantised base W (d_out, d_in))."""
    from peft.utils.integrations import dequantize_module_weight

    out = {}
    for key in adapter_state(model):
        if key.endswith(f".{VERA_D}"):
            name = key[: -len(VERA_D) - 1]
            layer = model.get_submodule(name)
            out[name] = (layer, dequantize_module_weight(layer.base_layer).float())
    return out


def _delta(state: dict[str, torch.Tensor], name: str, shape: torch.Size):  # type: ignore[no-untyped-def]
    """``diag(lambda_b) B[:d_out] diag(lambda_d) A[:, :d_in]`` in float64."""
    d_out, d_in = shape
    a = state["base_model.vera_A"].double()[:, :d_in]
    b = state["base_model.vera_B"].double()[:d_out, :]
    lam_b = state[f"{name}.{VERA_B}"].double()
    lam_d = state[f"{name}.{VERA_D}"].double()
    return lam_b[:, None] * (b * lam_d[None, :]) @ a


def test_the_reference_update_is_what_peft_computes_on_the_nf4_base() -> None:
    """The float64 reference below is the layer's own forward, projections sliced."""
    model = model_bundle(_cfg()).model
    state = adapter_state(model)
    shapes = {tuple(w.shape) for _, w in _matrices(model).values()}
    assert len({d_out for d_out, _ in shapes}) == 2  # B is sliced for one of them
    assert state["base_model.vera_A"].shape == (RANK, max(s[1] for s in shapes))
    assert state["base_model.vera_B"].shape == (max(s[0] for s in shapes), RANK)
    g = torch.Generator().manual_seed(0)
    for name, (layer, w) in _matrices(model).items():
        assert torch.equal(state[f"{name}.{VERA_B}"], torch.zeros(w.shape[0]))
        assert torch.allclose(state[f"{name}.{VERA_D}"], torch.full((RANK,), 0.1))
        trial = dict(state)
        trial[f"{name}.{VERA_B}"] = torch.randn(w.shape[0], generator=g)
        trial[f"{name}.{VERA_D}"] = torch.randn(RANK, generator=g)
        x = torch.randn(5, w.shape[1], generator=g)
        with torch.no_grad():
            layer.vera_lambda_b["default"].copy_(trial[f"{name}.{VERA_B}"])
            layer.vera_lambda_d["default"].copy_(trial[f"{name}.{VERA_D}"])
            got = layer(x).double()
            layer.vera_lambda_b["default"].zero_()
            layer.vera_lambda_d["default"].fill_(0.1)
        want = x.double() @ (w.double() + _delta(trial, name, w.shape)).T
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def _mean_delta(outs, weights, start, name, shape):  # type: ignore[no-untyped-def]
    """The ideal merge: the weighted mean of the clients' updates, float64."""
    clients = [{**start, **o.state} for o in outs]
    total = float(sum(weights))
    pairs = zip(weights, clients, strict=True)
    return sum(wt * _delta(c, name, shape) for wt, c in pairs) / total


def _merge(outs, start, variant: str = "lora"):  # type: ignore[no-untyped-def]
    weights = [o.num_examples for o in outs]
    strategy = FedAvgLora.from_config(_cfg(variant))
    strategy.global_state = start
    pairs = enumerate(zip(outs, weights, strict=True))
    replies = [adapter_reply(i + 1, o.state, n) for i, (o, n) in pairs]
    record, _ = strategy.aggregate_train(1, replies)
    assert record is not None
    return from_record(record), weights


def test_vera_clients_send_two_vectors_per_matrix_and_the_server_averages_each() -> (
    None
):
    """Only the lambdas travel (sum of d_out + r per matrix, no projections); the
    merge is the float64 weighted mean of each, projections kept; the merged
    update is not the mean of the clients' updates (measured)."""
    model = model_bundle(_cfg()).model
    start = adapter_state(model)
    outs = _train("lora", start)
    sizes = [w.shape[0] + RANK for _, w in _matrices(model).values()]
    for out in outs:
        assert {factor_of(k) for k in out.state} == {"lora_A", "lora_B"}
        assert num_params(out.state) == sum(sizes)  # 2 layers x (q_proj, up_proj)
        assert all(not torch.equal(out.state[k], start[k]) for k in out.state)
    merged, weights = _merge(outs, start)
    assert set(merged) == set(start)
    total = float(sum(weights))
    for key in start:
        if factor_of(key) == PROJECTION:
            assert torch.equal(merged[key], start[key])
            continue
        reference = sum(
            w * o.state[key].double() for w, o in zip(weights, outs, strict=True)
        )
        assert torch.allclose(merged[key].double(), reference / total, atol=1e-6)
    gaps = []
    for name, (_, w) in _matrices(model).items():
        ideal = _mean_delta(outs, weights, start, name, w.shape)
        got = _delta(merged, name, w.shape)
        gaps.append(float((got - ideal).norm() / ideal.norm()))
    assert all(gap > 1e-4 for gap in gaps), gaps  # benchmarks/family_merge.py


def test_ffa_vera_trains_lambda_b_alone_and_its_merge_is_exact() -> None:
    model = model_bundle(_cfg("ffa")).model
    start = adapter_state(model)
    outs = _train("ffa", start)
    for out in outs:
        assert out.state and all(k.endswith(f".{VERA_B}") for k in out.state)
    merged, weights = _merge(outs, start, "ffa")
    for name, (_, w) in _matrices(model).items():
        ideal = _mean_delta(outs, weights, start, name, w.shape)
        got = _delta(merged, name, w.shape)
        assert ideal.norm() > 0
        assert torch.allclose(got, ideal, rtol=1e-5, atol=1e-7)


def test_a_site_with_other_projections_is_refused() -> None:
    """The projections never travel: the server's fingerprint of them is checked."""
    start = adapter_state(model_bundle(_cfg()).model)
    other = adapter_state(model_bundle(_cfg(seed=7)).model)
    key = "base_model.vera_A"
    assert not torch.equal(start[key], other[key])
    sent = select(start, VARIANTS.get("lora").sends_down(1))
    assert not any(factor_of(k) == PROJECTION for k in sent)
    kept = [k for k in other if k not in sent]
    with pytest.raises(RuntimeError, match="frozen adapter tensors"):
        train_round(_cfg(), SiteConfig(0, CLIENTS), 1, sent, fingerprint(other, kept))


@pytest.mark.parametrize("variant", ["rolora", "la_lora"])
def test_the_alternating_variants_move_the_vectors_of_their_factor(
    variant: str,
) -> None:
    """RoLoRA round 1 trains lambda_b only; LA-LoRA alternates per step, and its
    low-pass filter (made for matrices) leaves the vectors' gradients as they are."""
    start = adapter_state(model_bundle(_cfg(variant)).model)
    for out in _train(variant, start):
        moved = {k for k in out.state if not torch.equal(out.state[k], start[k])}
        trained = VARIANTS.get(variant).factors_for_round(1)
        assert {factor_of(k) for k in moved} == set(trained)
        assert all(torch.isfinite(v).all() for v in out.state.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {
                "privacy.mode": "dp",
                "privacy.noise_multiplier": 1.0,
                "adapter.dropout": 0.1,
            },
            "adapter.dropout=0",
        ),
        ({"strategy.name": "hetlora"}, "strategy=fedavg"),
        ({"strategy.name": "she_lora"}, "strategy=fedavg"),
        ({"adapter.use_dora": True}, "peft_type=lora"),
        ({"adapter.peft_type": "ia3"}, "allowed"),
    ],
)
def test_vera_refuses_what_it_cannot_do_and_names_what_works(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        _cfg(**overrides)
    assert "peft_type" in str(err.value)


def test_lambda_b_learns_at_lr_ratio_b_and_lambda_d_at_the_base_rate() -> None:
    from fedlora.config import TrainConfig
    from fedlora.train import trainable_groups

    model = model_bundle(_cfg()).model
    groups = trainable_groups(model, TrainConfig(lr=1.0), lr_ratio_b=16.0)
    by_name = {n: g["base_lr"] for g in groups for n in g["names"]}
    assert len(by_name) == 8  # two vectors for each of four matrices
    for name, lr in by_name.items():
        assert lr == (16.0 if VERA_B in name else 1.0), name
