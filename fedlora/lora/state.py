"""Adapter tensors in and out of a PEFT model, and onto the wire.

Keys are exactly those of ``peft.get_peft_model_state_dict`` (e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` with
shape ``(r, d_in)`` and ``...lora_B.weight`` with shape ``(d_out, r)``, plus the task
head when it is trained). They are never rewritten by hand: loading goes through
``set_peft_model_state_dict`` and key *sets* are compared at the boundary.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from fedlora.protocol import RAW_STYPE, TRANSPORT_DTYPES

if TYPE_CHECKING:
    from flwr.app import Array, ArrayRecord
    from peft import PeftModel

StateDict = dict[str, Tensor]
A_SUFFIX = ".lora_A.weight"  # key suffix of A: (r, d_in)
B_SUFFIX = ".lora_B.weight"  # key suffix of B: (d_out, r)


MAGNITUDE = "lora_magnitude_vector"  # DoRA's m: (d_out,), a key's last part
VERA_D = "vera_lambda_d"  # VeRA's lambda_d: (r,) per matrix, scales A's rows
VERA_B = "vera_lambda_b"  # VeRA's lambda_b: (d_out,) per matrix, zero at the start
PROJECTION = "projection"  # factor_of VeRA's shared A (r, max d_in), B (max d_out, r)
_PROJECTION_KEYS = (".vera_A", ".vera_B")  # "base_model.vera_A" in the state


def is_magnitude(key: str) -> bool:
    """Whether ``key`` (state key or parameter name) is DoRA's magnitude vector."""
    return f".{MAGNITUDE}" in key


def is_vector(key: str) -> bool:
    """Whether ``key`` is a trained vector: DoRA's magnitude or VeRA's lambdas."""
    return is_magnitude(key) or f".{VERA_D}" in key or f".{VERA_B}" in key


def factor_of(key: str) -> str | None:
    """``"lora_A"``/``"lora_B"`` for a trained factor, ``PROJECTION``, or None.

    DoRA's magnitude vector ``m`` (``(d_out,)``, one per adapted matrix) counts as
    ``"lora_B"``: it is trained, sent and scheduled with B (FFA-LoRA trains and
    sends B and m, RoLoRA both in its B rounds, LA-LoRA both on its B steps). At
    the start ``B = 0`` and ``m = ||W||`` row-wise, so the update starts with the
    pair that moves the model.

    VeRA's update is ``diag(lambda_b) B diag(lambda_d) A``: ``lambda_b`` (zero at
    the start, beside the output like B) is ``"lora_B"`` and ``lambda_d`` is
    ``"lora_A"``, so FFA-LoRA trains ``lambda_b`` alone, where averaging is exact.
    VeRA's shared projections are ``PROJECTION``: never trained or sent, every site
    regenerates them and the server fingerprints them. None: the task head.
    """
    if is_magnitude(key) or f".{VERA_B}" in key:
        return "lora_B"
    if f".{VERA_D}" in key:
        return "lora_A"
    if key.endswith(_PROJECTION_KEYS) or any(f"{p}." in key for p in _PROJECTION_KEYS):
        return PROJECTION
    for factor in ("lora_A", "lora_B"):
        if f".{factor}." in key:
            return factor
    return None


def matrix_names(state: Mapping[str, Tensor]) -> list[str]:
    """Adapted matrices in ``state`` (key prefixes of ``.lora_A.weight``), sorted.

    The prefix is also the PEFT model's module name of that LoRA layer.
    """
    return sorted(k[: -len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX))


def factor_pairs(state: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name.lora_B.weight, name.lora_A.weight, ...}`` -> ``{name: (B, A)}``."""
    return {n: (state[n + B_SUFFIX], state[n + A_SUFFIX]) for n in matrix_names(state)}


def pairs_state(pairs: Mapping[str, tuple[Tensor, Tensor]]) -> StateDict:
    """Inverse of :func:`factor_pairs` (other tensors are not included)."""
    out: StateDict = {}
    for name, (b, a) in pairs.items():
        out[name + B_SUFFIX], out[name + A_SUFFIX] = b, a
    return out


def adapter_state(model: PeftModel) -> StateDict:
    """Detached float32 CPU copies of every adapter tensor (LoRA factors + head)."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().to("cpu", torch.float32).clone()
        for k, v in get_peft_model_state_dict(model).items()
    }


def select(state: Mapping[str, Tensor], factors: Iterable[str]) -> StateDict:
    """Keep the given LoRA factors and every non-factor tensor (the head).

    VeRA's shared projections are kept only if ``PROJECTION`` is in ``factors``.
    """
    keep = set(factors)
    return {
        k: v for k, v in state.items() if factor_of(k) in keep or factor_of(k) is None
    }


def load_adapter_state(model: PeftModel, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (all or some adapter tensors) into ``model``.

    Raises
    ------
    KeyError
        If ``state`` has keys the model's adapter does not have.
    ValueError
        If a tensor's shape differs from the model's.
    """
    from peft import set_peft_model_state_dict

    current = adapter_state(model)
    unknown = sorted(set(state) - set(current))
    if unknown:
        raise KeyError(f"Adapter keys not in the model: {unknown[:5]} ...")
    bad = [
        f"{k}: got {tuple(v.shape)}, model has {tuple(current[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(current[k].shape)
    ]
    if bad:
        raise ValueError("Adapter shape mismatch: " + "; ".join(bad[:5]))
    # peft loads VeRA only with its projections; they never travel (fingerprinted)
    shared = {k: v for k, v in current.items() if factor_of(k) == PROJECTION}
    result = set_peft_model_state_dict(model, {**shared, **state})
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"peft did not load adapter keys: {unexpected[:5]}")


# Wire element type -> torch dtype; bytes of the 16-bit types are read through an
# int16 view because numpy (Flower's Array) has no bfloat16.
_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def encode_array(key: str, tensor: Tensor, dtype: str = "float32") -> Array:
    """One adapter tensor -> Flower ``Array`` in the wire ``dtype``.

    float32 is Flower's numpy ``Array`` (the bytes of ``np.save``). The 16-bit
    types are rounded by torch (``tensor.to(dtype)``, round-to-nearest-even) and
    shipped as raw little-endian element bytes, ``2 * numel`` bytes with
    ``stype = protocol.RAW_STYPE``: numpy cannot hold bfloat16, and no numpy header
    (about 128 bytes a tensor) keeps a 16-bit payload at half the float32 one.

    Raises
    ------
    ValueError
        If ``dtype`` is not a transport dtype, or a finite value overflows it
        (float16 above 65504), naming ``key``.
    """
    from flwr.app import Array

    if dtype not in _TORCH_DTYPES:
        raise ValueError(
            f"{key}: transport dtype {dtype!r}; allowed: {list(TRANSPORT_DTYPES)}"
        )
    source = tensor.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return Array(source.numpy())
    cast = source.to(_TORCH_DTYPES[dtype]).contiguous()
    if (torch.isfinite(source) & ~torch.isfinite(cast)).any():
        raise ValueError(
            f"{key}: a value overflows {dtype} (max |x| {source.abs().max():.3g}); "
            "use federation.transport_dtype=bfloat16 or float32"
        )
    data = cast.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    return Array(dtype=dtype, shape=tuple(cast.shape), stype=RAW_STYPE, data=data)


def decode_array(array: Array) -> Tensor:
    """Flower ``Array`` -> CPU tensor; 16-bit wire types come back as float32.

    The upcast is exact, so the server aggregates in float32 what the client sent,
    and ``load_adapter_state`` casts it to each parameter's own dtype.

    Raises
    ------
    ValueError
        If the payload does not match its declared dtype, stype or shape.
    """
    if array.stype != RAW_STYPE:
        values = array.numpy()
        if (str(values.dtype), values.shape) != (array.dtype, tuple(array.shape)):
            raise ValueError(
                f"payload is {values.dtype} {values.shape}, declared "
                f"{array.dtype} {tuple(array.shape)}"
            )
        return torch.from_numpy(values)
    if array.dtype not in ("bfloat16", "float16"):
        raise ValueError(f"raw payload of dtype {array.dtype!r}; allowed: 16-bit")
    size = TRANSPORT_DTYPES[array.dtype] * math.prod(array.shape)
    if len(array.data) != size:
        raise ValueError(
            f"{len(array.data)} bytes for shape {tuple(array.shape)} in "
            f"{array.dtype} (expected {size})"
        )
    bits = np.frombuffer(array.data, dtype="<i2").astype(np.int16)
    wide = torch.from_numpy(bits).view(_TORCH_DTYPES[array.dtype]).float()
    return wide.reshape(tuple(array.shape))


def to_record(state: Mapping[str, Tensor], dtype: str = "float32") -> ArrayRecord:
    """Adapter tensors -> Flower ArrayRecord, each in the wire ``dtype``.

    ``dtype`` is ``federation.transport_dtype`` for what goes on the wire; records
    that never leave the server (the global adapter between rounds) stay float32.
    """
    from flwr.app import ArrayRecord

    return ArrayRecord({k: encode_array(k, v, dtype) for k, v in state.items()})


def from_record(record: ArrayRecord) -> StateDict:
    """Flower ArrayRecord -> adapter tensors (CPU; 16-bit wire types as float32)."""
    return {k: decode_array(v) for k, v in record.items()}


def num_params(state: Mapping[str, Tensor]) -> int:
    """Total number of scalars in ``state``."""
    return sum(v.numel() for v in state.values())


def fingerprint(state: Mapping[str, Tensor], keys: Iterable[str]) -> str:
    """SHA-256 over the given tensors (sorted keys, shapes, float32 bytes).

    FFA-LoRA never sends A: every client regenerates it from the shared seed, and
    the server's fingerprint of A proves the copies are identical.
    """
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
