"""Adapter tensors in and out of a PEFT model, and onto the wire.

Keys are exactly those of ``peft.get_peft_model_state_dict`` (e.g.
``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`` with
shape ``(r, d_in)`` and ``...lora_B.weight`` with shape ``(d_out, r)``, plus the task
head when it is trained). They are never rewritten by hand: loading goes through
``set_peft_model_state_dict`` and key *sets* are compared at the boundary.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from flwr.app import ArrayRecord
    from peft import PeftModel

StateDict = dict[str, Tensor]
A_SUFFIX = ".lora_A.weight"  # key suffix of A: (r, d_in)
B_SUFFIX = ".lora_B.weight"  # key suffix of B: (d_out, r)


def factor_of(key: str) -> str | None:
    """``"lora_A"``/``"lora_B"`` for a LoRA factor key, None for other tensors."""
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
    """Keep the given LoRA factors and every non-factor tensor (the head)."""
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
    result = set_peft_model_state_dict(model, dict(state))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KeyError(f"peft did not load adapter keys: {unexpected[:5]}")


def to_record(state: Mapping[str, Tensor]) -> ArrayRecord:
    """Adapter tensors -> Flower ArrayRecord (float32; numpy has no bfloat16)."""
    from flwr.app import ArrayRecord

    return ArrayRecord(
        {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    )


def from_record(record: ArrayRecord) -> StateDict:
    """Flower ArrayRecord -> adapter tensors (CPU)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


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
