"""Aggregation math against explicit float64 references."""

from __future__ import annotations

import pytest
import torch

from strategies.aggregation import (
    merge_into,
    normalise_weights,
    product_mean,
    weighted_mean,
)
from strategies.exceptions import AggregationError


def _clients(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "l0.lora_A.weight": torch.randn(4, 16, generator=g),
            "l0.lora_B.weight": torch.randn(12, 4, generator=g),
            "head.weight": torch.randn(3, 12, generator=g),
        }
        for _ in range(n)
    ]


def test_weighted_mean_is_exact() -> None:
    """Every key equals sum_i w_i X_i / sum_i w_i computed in float64."""
    states = [{k: v.double() for k, v in s.items()} for s in _clients(5)]
    weights = [10.0, 3.0, 7.0, 1.0, 29.0]
    out = weighted_mean(states, weights)
    total = sum(weights)
    bad = []
    for key in states[0]:
        ref = sum(w * s[key] for w, s in zip(weights, states, strict=True)) / total
        if not torch.allclose(out[key], ref, rtol=0, atol=1e-12):
            bad.append((key, float((out[key] - ref).abs().max())))
    assert not bad, f"keys off the reference: {bad}"


def test_float32_inputs_match_float64_reference_to_one_rounding() -> None:
    states = _clients(4)
    out = weighted_mean(states, [1, 2, 3, 4])
    for key in states[0]:
        ref = (
            sum(w * s[key].double() for w, s in zip([1, 2, 3, 4], states, strict=True))
            / 10
        )
        assert out[key].dtype == torch.float32
        assert torch.equal(out[key], ref.float()), key


def test_identical_clients_give_back_the_client() -> None:
    one = _clients(1)[0]
    out = weighted_mean([one, one, one], [5, 1, 100])
    for key, value in one.items():
        assert torch.equal(out[key], value), key


def test_inputs_are_not_mutated() -> None:
    states = _clients(3)
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    weighted_mean(states, [1, 1, 1])
    for s, c in zip(states, copies, strict=True):
        assert all(torch.equal(s[k], c[k]) for k in s)


def test_mismatched_keys_and_shapes_are_rejected() -> None:
    a, b = _clients(2)
    b_missing = {k: v for k, v in b.items() if k != "head.weight"}
    with pytest.raises(AggregationError, match="different keys"):
        weighted_mean([a, b_missing], [1, 1])
    b_shape = dict(b, **{"head.weight": torch.zeros(3, 11)})
    with pytest.raises(AggregationError, match="shape"):
        weighted_mean([a, b_shape], [1, 1])


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], [1, float("nan")]])
def test_bad_weights_are_rejected(weights: list[float]) -> None:
    with pytest.raises(AggregationError):
        normalise_weights(weights)


def test_product_mean_matches_explicit_sum_with_different_ranks() -> None:
    g = torch.Generator().manual_seed(1)
    factors = [
        (torch.randn(6, r, generator=g), torch.randn(r, 5, generator=g))
        for r in (2, 4, 8)
    ]
    weights = [1.0, 2.0, 5.0]
    ref = (
        sum(
            w * (b.double() @ a.double())
            for w, (b, a) in zip(weights, factors, strict=True)
        )
        / 8
    )
    assert torch.allclose(product_mean(factors, weights), ref, atol=1e-12)


def test_fedavg_of_factors_is_not_the_mean_of_products() -> None:
    """Documented property: mean(B) @ mean(A) != mean(B @ A) when factors differ."""
    states = _clients(3)
    avg = weighted_mean(states, [1, 1, 1])
    prod_of_means = avg["l0.lora_B.weight"].double() @ avg["l0.lora_A.weight"].double()
    mean_of_prods = product_mean(
        [(s["l0.lora_B.weight"], s["l0.lora_A.weight"]) for s in states], [1, 1, 1]
    )
    assert (prod_of_means - mean_of_prods).abs().max() > 1e-3


def test_merge_into_replaces_only_sent_keys() -> None:
    glob, upd = _clients(2)
    partial = {"l0.lora_B.weight": upd["l0.lora_B.weight"]}
    out = merge_into(glob, partial)
    assert torch.equal(out["l0.lora_B.weight"], upd["l0.lora_B.weight"])
    assert torch.equal(out["l0.lora_A.weight"], glob["l0.lora_A.weight"])
    with pytest.raises(AggregationError):
        merge_into(glob, {"unknown": torch.zeros(1)})
