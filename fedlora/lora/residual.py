"""A frozen full-precision low-rank delta beside the (4-bit) base: FLoRA's merge.

FLoRA merges each round's stacked update into the base weights and restarts the
clients' LoRA adapters. Merging into NF4 weights would re-quantise them (and the
public checkpoint would no longer be the model), so the delta is kept beside the
base instead: every adapted layer's output gains ``x A_res^T B_res^T`` with
``B_res: (d_out, R)`` and ``A_res: (R, d_in)`` in float32, scale 1, never trained.
A forward hook on the PEFT LoRA layer adds it after base + LoRA, so gradients of
the trainable adapter (and Opacus' per-sample hooks) are unaffected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedlora.lora.rank import pad_rank
from fedlora.lora.state import pairs_state

Residual = Mapping[str, tuple[Tensor, Tensor]]  # matrix name -> (B_res, A_res)
# Message record that carries the residual (``adapters.pairs_state`` layout).

_HANDLES = "_fedlora_residual_hooks"


def _hook(b: Tensor, a: Tensor) -> Any:
    def add(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0]
        a_x, b_x = a.to(x.device, x.dtype), b.to(x.device, x.dtype)
        return output + (x @ a_x.T) @ b_x.T

    return add


def set_residual(model: nn.Module, residual: Residual) -> None:
    """Replace the model's residual deltas (an empty mapping removes them).

    Names are the adapter key prefixes (``...query`` for ``...query.lora_A.weight``),
    i.e. module names of the PEFT model.
    """
    for handle in getattr(model, _HANDLES, []):
        handle.remove()
    handles = []
    modules = dict(model.named_modules())
    for name, (b, a) in residual.items():
        if name not in modules:
            raise KeyError(f"residual for {name!r}, which is not a module of the model")
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"residual {name}: B {tuple(b.shape)} A {tuple(a.shape)}")
        frozen_b = b.detach().to(torch.float32).clone()
        frozen_a = a.detach().to(torch.float32).clone()
        handles.append(modules[name].register_forward_hook(_hook(frozen_b, frozen_a)))
    setattr(model, _HANDLES, handles)


def write_residual_adapter(path: Any, residual: Residual) -> int:
    """Rewrite the PEFT adapter saved in ``path`` so that its LoRA *is* the residual.

    ``path`` holds a ``save_pretrained`` directory of the same model (its task head
    and config are kept). Every matrix's LoRA becomes ``(B_res, A_res)`` zero-padded
    to the largest residual rank ``R``, with ``r = lora_alpha = R`` (scale 1) and
    rsLoRA off, so ``PeftModel.from_pretrained(base, path)`` computes exactly base +
    residual. Returns ``R``.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    root = Path(path)
    weights = load_file(str(root / "adapter_model.safetensors"))
    rank = max((b.shape[1] for b, _ in residual.values()), default=0)
    padded = {}
    for name, (b, a) in residual.items():
        pad_b, pad_a = pad_rank(b.float(), a.float(), rank)
        padded[name] = (pad_b.contiguous(), pad_a.contiguous())
    weights.update(pairs_state(padded))
    save_file(weights, str(root / "adapter_model.safetensors"))
    config_path = root / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update({"r": rank, "lora_alpha": rank, "use_rslora": False})
    config_path.write_text(json.dumps(config, indent=2))
    return rank
