"""The low-rank math (``fedlora.lora.rank``) and HetLoRA's merge against direct
float64 references."""

from __future__ import annotations

import pytest
import torch
from lowrank_reference import mean_update

from fedlora.lora.rank import (
    best_rank_factors,
    pad_rank,
    product_mean,
    stack_factors,
    svd_factors,
)
from strategies.aggregation import normalise_weights, weighted_mean
from strategies.hetlora import hetlora_merge
from strategies.rank_aware import truncate_state

D_OUT, D_IN = 12, 10


def _clients(
    ranks: list[int], seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(D_OUT, r, generator=g, dtype=torch.float64),
            torch.randn(r, D_IN, generator=g, dtype=torch.float64),
        )
        for r in ranks
    ]


def test_padding_keeps_the_product_and_truncation_inverts_it() -> None:
    ((b, a),) = _clients([3])
    b_pad, a_pad = pad_rank(b, a, 8)
    assert b_pad.shape == (D_OUT, 8) and a_pad.shape == (8, D_IN)
    assert torch.allclose(b_pad @ a_pad, b @ a, atol=1e-12)
    back = truncate_state({"m.lora_B.weight": b_pad, "m.lora_A.weight": a_pad}, 3)
    assert torch.equal(back["m.lora_B.weight"], b)
    assert torch.equal(back["m.lora_A.weight"], a)
    with pytest.raises(ValueError, match="exceeds the maximum rank"):
        pad_rank(b, a, 2)


def test_hetlora_with_equal_ranks_equals_fedavg() -> None:
    clients = _clients([4, 4, 4])
    weights = [3.0, 1.0, 2.0]
    b, a = hetlora_merge(
        clients, weights, [2.0] * 3, r_max=4, s_max=2.0, norm_weighting=False
    )
    states = [{"B": cb, "A": ca} for cb, ca in clients]
    ref = weighted_mean(states, weights)
    assert torch.allclose(b, ref["B"], atol=1e-12) and torch.allclose(
        a, ref["A"], atol=1e-12
    )


def test_hetlora_norm_weighting_uses_the_update_norms() -> None:
    clients = _clients([2, 4, 8])
    scales = [16 / 2, 16 / 4, 16 / 8]
    norms = [
        s * float(torch.linalg.matrix_norm(cb @ ca))
        for s, (cb, ca) in zip(scales, clients, strict=True)
    ]
    b, a = hetlora_merge(
        clients, [1.0, 1.0, 1.0], scales, r_max=8, s_max=2.0, norm_weighting=True
    )
    padded = [
        pad_rank(cb * s / 2.0, ca, 8)
        for s, (cb, ca) in zip(scales, clients, strict=True)
    ]
    ref_b = sum(n * pb for n, (pb, _) in zip(norms, padded, strict=True)) / sum(norms)
    assert torch.allclose(b, ref_b, atol=1e-12)
    assert b.shape == (D_OUT, 8) and a.shape == (8, D_IN)


def test_flora_stacking_equals_the_weighted_mean_of_the_updates() -> None:
    clients = _clients([2, 4, 8])
    weights, scales = [5.0, 2.0, 1.0], [16 / 2, 16 / 4, 16 / 8]
    b, a = stack_factors(clients, normalise_weights(weights), scales)
    assert b.shape == (D_OUT, 14) and a.shape == (14, D_IN)
    ref = sum(
        w * s * (cb @ ca)
        for w, s, (cb, ca) in zip(weights, scales, clients, strict=True)
    )
    ref = ref / sum(weights)
    assert torch.allclose(b @ a, ref, rtol=1e-12, atol=1e-12)
    p = normalise_weights(weights)
    assert torch.allclose(product_mean(clients, p, scales), ref, atol=1e-12)


def test_flexlora_gives_each_client_its_best_rank_r_approximation() -> None:
    delta = mean_update(_clients([4, 8, 8]), [1.0, 1.0, 2.0], [4.0, 2.0, 2.0])
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    ranks, scales = [2, 4, 16], [8.0, 4.0, 1.0]
    for r, sc in zip(ranks, scales, strict=True):
        b, a = svd_factors(u, s, vh, r, sc)  # one SVD serves every rank (FlexLoRA)
        assert b.shape == (D_OUT, r) and a.shape == (r, D_IN)
        k = min(r, s.numel())
        direct = (u[:, :k] * s[:k]) @ vh[:k]
        assert torch.allclose(sc * (b @ a), direct, atol=1e-10)
        # Eckart-Young: the error is the norm of the dropped singular values
        err = torch.linalg.matrix_norm(delta - sc * (b @ a))
        assert err == pytest.approx(float(s[k:].square().sum().sqrt()), abs=1e-9)
    b, a = best_rank_factors(delta, 16, 1.0)
    assert torch.allclose(b @ a, delta, atol=1e-10)  # full rank: exact


def test_inconsistent_shapes_are_rejected() -> None:
    (b, a), (b2, a2) = _clients([2, 3])
    with pytest.raises(ValueError, match="do not form"):
        stack_factors([(b, a), (b2, a)], [0.5, 0.5], [1.0, 1.0])
