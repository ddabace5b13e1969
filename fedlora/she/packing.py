"""Packing selected update columns into CKKS ciphertexts, adding, decrypting.

Layout (shared by every client, so ciphertexts add slot by slot): the adapted
matrices are taken in sorted-name order with output sizes ``m_1..m_M`` and
``S = sum m``. Column slot ``l`` (the ``l``-th negotiated column of every matrix)
occupies flat positions ``[l S, (l + 1) S)``, matrix by matrix. A client with budget
``k`` fills the first ``k S`` values and sends ``ceil(k S / slots)`` ciphertexts,
the last zero-padded; a client with a larger budget sends more. Summing chunk ``c``
over the clients that sent it is therefore the sum of every client's column
``l`` for the clients that encrypted it — the others sent that column in
plaintext. Several columns share one ciphertext whenever ``S < slots``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlora.she.keys import SLOTS


def num_chunks(k: int, sizes: Sequence[int], slots: int = SLOTS) -> int:
    """Ciphertexts needed for ``k`` column slots of matrices with output ``sizes``."""
    return math.ceil(k * sum(sizes) / slots)


def flatten_columns(columns: Mapping[str, Tensor]) -> np.ndarray:
    """``{matrix: (m, k)}`` (same ``k``) -> flat float64 vector in slot layout."""
    names = sorted(columns)
    ks = {columns[n].shape[1] for n in names}
    if len(ks) != 1:
        raise ValueError(f"every matrix needs the same column count, got {ks}")
    (k,) = ks
    parts = [columns[n][:, ell].double().numpy() for ell in range(k) for n in names]
    return np.concatenate(parts) if parts else np.zeros(0)


def unflatten_columns(
    flat: np.ndarray, sizes: Mapping[str, int], k: int
) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_columns` for ``k`` column slots."""
    names = sorted(sizes)
    out = {n: torch.zeros(sizes[n], k, dtype=torch.float64) for n in names}
    pos = 0
    for ell in range(k):
        for n in names:
            m = sizes[n]
            out[n][:, ell] = torch.from_numpy(np.asarray(flat[pos : pos + m]))
            pos += m
    return out


def encrypt_columns(
    ctx: Any, columns: Mapping[str, Tensor], slots: int = SLOTS
) -> list[bytes]:
    """Encrypt the packed columns; each chunk is exactly ``slots`` values long."""
    import tenseal as ts

    flat = flatten_columns(columns)
    chunks = []
    for start in range(0, flat.size, slots):
        part = np.zeros(slots)
        piece = flat[start : start + slots]
        part[: piece.size] = piece
        chunks.append(ts.ckks_vector(ctx, part.tolist()).serialize())
    return chunks


def add_ciphertexts(public_ctx: Any, uploads: Sequence[Sequence[bytes]]) -> list[bytes]:
    """Chunk-wise homomorphic sum over the clients that sent each chunk.

    Runs with a public context (no secret key): addition needs none.
    """
    import tenseal as ts

    total: list[Any] = []
    for chunks in uploads:
        for c, data in enumerate(chunks):
            vec = ts.ckks_vector_from(public_ctx, data)
            if c < len(total):
                total[c] = total[c] + vec
            else:
                total.append(vec)
    return [v.serialize() for v in total]


def decrypt_columns(
    secret_ctx: Any, chunks: Sequence[bytes], sizes: Mapping[str, int], k: int
) -> dict[str, Tensor]:
    """Decrypt summed chunks back to ``{matrix: (m, k)}`` float64 columns."""
    import tenseal as ts

    need = k * sum(sizes.values())
    values: list[float] = []
    for data in chunks:
        values.extend(ts.ckks_vector_from(secret_ctx, data).decrypt())
    flat = np.zeros(need)
    n = min(need, len(values))
    flat[:n] = values[:n]
    return unflatten_columns(flat, sizes, k)


def ordered_chunks(record: Mapping[str, Any] | None) -> list[bytes]:
    """Ciphertext chunks stored as ``c0, c1, ...`` in a record, in order."""
    out: list[bytes] = []
    while record is not None and f"c{len(out)}" in record:
        value = record[f"c{len(out)}"]
        if not isinstance(value, bytes):
            raise TypeError(f"ciphertext c{len(out)} is {type(value).__name__}")
        out.append(value)
    return out
