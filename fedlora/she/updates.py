"""A client's SHE-LoRA update: column scores, encrypted upload, merged-update rebuild.

Deviation from the paper (documented on purpose): the paper encrypts the selected
columns of ``A_i`` (``r_i`` values each) and has the server multiply them by the
plaintext ``B_i^T`` under encryption (Galois keys, one level of noise, the server
sees ``B_i`` and multiplies it in). Here the client computes the selected columns
of its *own* update ``s_i B_i A_i`` (``m`` values each), scales them by its
aggregation weight and encrypts those, packed several per ciphertext. The server
then only adds ciphertexts. It learns nothing more: it sees the same plaintext
``B_i`` and zeroed ``A_i`` as in the paper, and the encrypted values are a
deterministic function of what the paper encrypts together with ``B_i``, which
the server already holds. What it gains: no Galois keys (a 34 MB public context
becomes 0.26 MB), no ciphertext-plaintext multiplication, exact weighted means
(every client's weight is folded in before encryption, so the server needs no
contributor counts), and fewer ciphertexts when ``m`` is below the slot count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fedlora.lora.state import A_SUFFIX, B_SUFFIX, StateDict, matrix_names
from fedlora.she.columns import (
    adapter_column_scores,
    column_scores,
    swap_columns,
    top_columns,
)
from fedlora.she.packing import decrypt_columns, encrypt_columns


@torch.no_grad()
def input_norms(
    model: nn.Module,
    batches: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
) -> dict[str, Tensor]:
    """``||X_j||_2`` of every input feature of every adapted matrix.

    ``batches``: already collated and on the model's device; padded tokens are
    excluded through ``attention_mask``. Returns ``{matrix: (d_in,)}`` float64.
    """
    modules = dict(model.named_modules())
    sums: dict[str, Tensor] = {}
    mask_box: list[Tensor | None] = [None]
    hooks = []

    def hook_for(name: str) -> Any:
        def hook(_: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().double()  # (b, seq, d_in) or (b, d_in)
            sq = x.pow(2)
            mask = mask_box[0]
            if mask is not None and sq.dim() == 3:
                sq = sq * mask[..., None].double()
            total = sq.reshape(-1, sq.shape[-1]).sum(0).cpu()
            sums[name] = sums.get(name, torch.zeros_like(total)) + total

        return hook

    for name in names:
        if name not in modules:
            raise KeyError(f"adapted matrix {name!r} is not a module of the model")
        hooks.append(modules[name].register_forward_pre_hook(hook_for(name)))
    try:
        model.eval()
        for batch in batches:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            mask_box[0] = inputs.get("attention_mask")
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n].sqrt() for n in names}


Choice = tuple[list[int], list[float]]  # best positions first, their scores


def _choice(scores: Tensor, budget: int) -> Choice:
    """Return the ``budget`` best positions of ``scores`` ``(d_in,)``, their scores."""
    positions = top_columns(scores, budget)
    return positions, [float(scores[p]) for p in positions]


def sensitivity(
    state: Mapping[str, Tensor], norms: Mapping[str, Tensor], budget: int
) -> dict[str, Choice]:
    """Each matrix's ``budget`` most sensitive columns and their scores.

    ``state``: the adapter (``A``: ``(r, d_in)`` per matrix); ``norms``:
    ``{matrix: (d_in,)}`` from :func:`input_norms` on the client's own data.
    """
    return {
        name: _choice(column_scores(state[name + A_SUFFIX], norms[name]), budget)
        for name in matrix_names(state)
    }


def private_sensitivity(state: Mapping[str, Tensor], budget: int) -> dict[str, Choice]:
    """Column choice of a DP client: a function of its adapter only.

    Under ``privacy=dp`` everything a client sends must be post-processing of its
    DP-trained adapter; scores over raw calibration examples (``||X_j||``) would
    be an unnoised, unaccounted release. This scores column ``j`` by
    ``sum_rho |A[rho, j]|`` (:func:`adapter_column_scores`), the paper's score with
    the data term set to one. At negotiation (before round 1) the adapter a client
    holds is the seeded initial one, so the scores are independent of the data
    and cost no privacy; on a DP-trained adapter they would be post-processing,
    also free. The message keeps its form (``budget`` positions and scores per
    matrix), so the server's negotiation is unchanged. The price: the choice no
    longer follows the client's input energy, i.e. the encryption protects the
    columns where the adapter is largest, and the DP guarantee is what bounds
    what an update reveals about one example.

    ``state``: the adapter (``A``: ``(r, d_in)`` per matrix). Returns
    ``{matrix: (positions, scores)}``, ``budget`` of each, best first.
    """
    return {
        name: _choice(adapter_column_scores(state[name + A_SUFFIX]), budget)
        for name in matrix_names(state)
    }


def encrypt_upload(
    state: Mapping[str, Tensor],
    cols: Mapping[str, Sequence[int]],
    *,
    scale: float,
    weight: float,
    ctx: Any,
) -> tuple[StateDict, list[bytes]]:
    """Split a trained adapter into its plaintext and encrypted parts.

    Returns the state to send in clear (``A`` with the selected columns zeroed and
    moved to the tail, B and head unchanged) and the ciphertexts of
    ``weight * s * B A[:, cols]`` for every matrix, packed in slot layout.
    """
    plain = dict(state)
    columns: dict[str, Tensor] = {}
    for name in matrix_names(state):
        c = list(cols.get(name, []))
        b, a = state[name + B_SUFFIX].double(), state[name + A_SUFFIX].double()
        columns[name] = weight * scale * (b @ a[:, c])  # (m, k)
        zeroed = state[name + A_SUFFIX].clone()
        zeroed[:, c] = 0.0
        plain[name + A_SUFFIX] = swap_columns(zeroed, c)
    k = {t.shape[1] for t in columns.values()}
    chunks = encrypt_columns(ctx, columns) if k and max(k) > 0 else []
    return plain, chunks


def merged_updates(
    plain: Mapping[str, tuple[Tensor, Tensor]],
    summed: Sequence[bytes],
    cols: Mapping[str, Sequence[int]],
    total_weight: float,
    ctx: Any,
) -> dict[str, Tensor]:
    """Rebuild each matrix's merged update: plaintext part + decrypted columns.

    ``plain``: ``{matrix: (B_p, A_p)}`` with ``B_p A_p`` the server's weighted mean
    of the clients' plaintext parts; ``summed``: the server's sums of the clients'
    ciphertexts; ``cols``: the negotiated columns those sums cover (same length
    for every matrix); ``total_weight``: the sum of the clients' weights.
    Returns ``{matrix: dW (m, n)}`` float64.
    """
    dense = {n: b.double() @ a.double() for n, (b, a) in plain.items()}
    k = len(next(iter(cols.values()), []))
    if summed and k:
        sizes = {n: dense[n].shape[0] for n in dense}
        decrypted = decrypt_columns(ctx, summed, sizes, k)
        for n, c in cols.items():
            dense[n][:, list(c)] += decrypted[n] / total_weight
    return dense
