"""SHE-LoRA building blocks against direct references: CKKS sums, swapping,
negotiation, and the whole encrypted merge against the plaintext product merge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lowrank_reference import mean_update

from fedlora.she.columns import (
    Selection,
    column_scores,
    negotiate,
    swap_columns,
    top_columns,
    unswap_columns,
)
from fedlora.she.keys import (
    HEContextError,
    context_id,
    create_contexts,
    load_public_context,
    load_secret_context,
)
from fedlora.she.packing import (
    add_ciphertexts,
    decrypt_columns,
    encrypt_columns,
    num_chunks,
)
from fedlora.she.updates import encrypt_upload, merged_updates


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return create_contexts(tmp_path_factory.mktemp("he"))


def test_secret_and_public_contexts_are_one_pair(keys: tuple[Path, Path]) -> None:
    secret_path, public_path = keys
    secret, public = load_secret_context(secret_path), load_public_context(public_path)
    assert secret.is_private() and not public.is_private()
    assert context_id(secret) == context_id(public)
    assert secret_path.stat().st_mode & 0o077 == 0  # owner-only
    with pytest.raises(HEContextError, match="holds the clients' secret key"):
        load_public_context(secret_path)
    with pytest.raises(HEContextError, match="holds no secret key"):
        load_secret_context(public_path)
    with pytest.raises(HEContextError, match="does not exist"):
        load_public_context(public_path.parent / "missing.ctx")


def test_decrypt_of_summed_ciphertexts_equals_plaintext_sum(
    keys: tuple[Path, Path],
) -> None:
    """Three clients, budgets 1, 2, 3 columns, two matrices; sum on the public key."""
    secret = load_secret_context(keys[0])
    public = load_public_context(keys[1])
    sizes = {"m1": 40, "m2": 24}
    g = torch.Generator().manual_seed(0)
    uploads, cols = [], []
    for k in (1, 2, 3):
        c = {
            n: torch.randn(m, k, generator=g, dtype=torch.float64)
            for n, m in sizes.items()
        }
        cols.append(c)
        uploads.append(encrypt_columns(secret, c, slots=64))
        assert len(uploads[-1]) == num_chunks(k, list(sizes.values()), slots=64)
    total = decrypt_columns(secret, add_ciphertexts(public, uploads), sizes, 3)
    for n, m in sizes.items():
        want = torch.zeros(m, 3, dtype=torch.float64)
        for c in cols:  # a client with budget k contributes to slots < k only
            want[:, : c[n].shape[1]] += c[n]
        rel = float((total[n] - want).norm() / want.norm())
        assert rel < 1e-6, rel


def test_swap_unswap_round_trips_and_moves_selected_columns_to_the_tail() -> None:
    a = torch.arange(2 * 10, dtype=torch.float32).reshape(2, 10)
    for cols in ([3, 1], [9, 0, 4], [8, 9], [7, 9, 2, 8], []):
        swapped = swap_columns(a, cols)
        assert torch.equal(unswap_columns(swapped, cols), a)
        for ell, c in enumerate(cols):
            assert torch.equal(swapped[:, 9 - ell], a[:, c])
        assert sorted(swapped[0].tolist()) == sorted(a[0].tolist())  # a permutation
    with pytest.raises(ValueError, match="distinct"):
        swap_columns(a, [1, 1])


def test_column_scores_and_top_columns_match_hand_computation() -> None:
    a = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 1.0, 0.5]])
    norms = torch.tensor([1.0, 0.5, 4.0])
    scores = column_scores(a, norms)  # sum |A| * norm = [2, 1.5, 4]
    assert scores.tolist() == [2.0, 1.5, 4.0]
    assert top_columns(scores, 2) == [2, 0]


def test_negotiation_is_one_nested_list_led_by_agreed_columns() -> None:
    sels = [
        Selection(2, [5, 7], [9.0, 8.0]),
        Selection(2, [5, 3], [7.0, 6.0]),
        Selection(4, [7, 5, 1, 2], [5.0, 4.0, 3.0, 2.0]),
    ]
    order = negotiate(sels, d_in=10)
    assert len(order) == 4 and len(set(order)) == 4
    # level 2: column 5 chosen by all three budget>=2 clients, 7 by two
    assert order[:2] == [5, 7]
    # level 4: the only budget-4 client adds its own choices 1 and 2
    assert order[2:] == [1, 2]
    # a budget-k client encrypts exactly order[:k]: prefixes are nested
    for k in (1, 2, 3, 4):
        assert set(order[:k]) <= set(order[: k + 1])
    # too few candidates: the list is filled from the highest scores
    assert negotiate([Selection(3, [4], [1.0])], d_in=5)[:1] == [4]
    assert len(negotiate([Selection(3, [4], [1.0])], d_in=5)) == 3


def test_encrypted_merge_equals_plaintext_product_merge(
    keys: tuple[Path, Path],
) -> None:
    """Clients of ranks 2/3/4 and budgets 1/2/3: client encrypt -> server
    unswap + product mean + ciphertext sum -> client decrypt = mean(s_i B_i A_i)."""
    secret = load_secret_context(keys[0])
    public = load_public_context(keys[1])
    m, n = 12, 10
    order = [6, 2, 9]
    g = torch.Generator().manual_seed(1)
    ranks, budgets, weights = [2, 3, 4], [1, 2, 3], [30.0, 50.0, 20.0]
    scales = [16.0 / r for r in ranks]
    factors = [
        (torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)) for r in ranks
    ]
    plain_parts, uploads = [], []
    for (b, a), k, w, s in zip(factors, budgets, weights, scales, strict=True):
        state = {"x.lora_B.weight": b, "x.lora_A.weight": a}
        sent, chunks = encrypt_upload(
            state, {"x": order[:k]}, scale=s, weight=w, ctx=secret
        )
        # the server sees A with the selected columns zeroed (swapped to the tail)
        assert torch.all(sent["x.lora_A.weight"][:, n - k :] == 0)
        plain_parts.append((b, unswap_columns(sent["x.lora_A.weight"], order[:k])))
        uploads.append(chunks)
    p = mean_update(plain_parts, weights, scales)  # server, plaintext only
    summed = add_ciphertexts(public, uploads)
    merged = merged_updates(
        {"x": (p, torch.eye(n, dtype=torch.float64))},
        summed,
        {"x": order},
        sum(weights),
        secret,
    )["x"]
    want = mean_update(factors, weights, scales)
    err = float((merged - want).norm() / want.norm())
    assert err < 1e-6, err
    # and the encrypted columns really were missing from the plaintext part
    assert float((p - want)[:, order].norm()) > 1e-2
    assert np.isfinite(err)
