"""LoftQ initialisation for QLoRA: LoRA factors that cancel the quantisation error.

LoftQ [Li et al., ICLR 2024] starts LoRA on a quantised base ``Q = NF4(W)`` from
the best rank-``r`` approximation of the error it leaves::

    W - deq(Q) ~= s B A,   (A, B) = top-r SVD split of (W - deq(Q)) / s

so ``deq(Q) + s B A`` is closer to ``W`` than ``deq(Q)`` alone. This is one
alternating step (peft's ``replace_lora_weights_loftq``), which keeps the base the
standard NF4 one: nothing but the factors changes, and the base fingerprint still
pins it. Differences from peft, both on purpose:

- the error is that of the base *as loaded* (``dequantize_module_weight`` of the
  site's own NF4 layer, double quantisation included), not a re-quantisation with
  other settings; peft's helper also needs CUDA, this runs on the CPU too;
- the split divides by the LoRA scale ``s`` (peft assigns the SVD factors as they
  are, which is right only when ``lora_alpha = r``).

In federation every site must start from the same factors and the same ``Q``:
the SVD is float64 (:func:`fedlora.lora.pissa.pissa_split`), the factors are
computed once per configuration into the cache, and a digest of the dequantised
adapted weights goes into the model config (``fedlora_loftq_base``), which the
base fingerprint hashes: a site whose NF4 weights differ is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from fedlora.lora.pissa import (
    FACTORS_FILE,
    float32_on_cpu,
    init_key,
    pissa_split,
    residual_digest,
)
from fedlora.lora.state import A_SUFFIX, B_SUFFIX, StateDict

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PretrainedConfig

    from fedlora.config import AdapterConfig, ModelConfig

BASE_KEY = "fedlora_loftq_base"  # config entry: digest of the dequantised weights
_PREFIX = "base_model.model."


def quantised_layers(model: PeftModel) -> dict[str, tuple[Tensor, float]]:
    """Adapted module name -> (dequantised base weight (d_out, d_in), LoRA scale).

    Names are those of ``model.named_modules()``; raises if a LoRA layer's base is
    not quantised (LoftQ needs a quantisation error to cancel).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    out = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        base = layer.get_base_layer()
        if base.weight.dtype not in (torch.uint8, torch.int8):
            raise ValueError(
                f"{name}: LoftQ fits the quantisation error of every adapted layer, "
                f"and this one is not quantised ({base.weight.dtype}); with "
                "model.quantization=nf4 the layers bitsandbytes keeps in full "
                "precision (the output head) cannot be LoftQ targets: leave them "
                "out of adapter.target_modules"
            )
        weight = dequantize_module_weight(base).detach().to("cpu", torch.float32)
        out[name] = (weight, float(layer.scaling["default"]))
    return out


def loftq_split(
    original: Tensor, dequantised: Tensor, rank: int, scaling: float
) -> tuple[Tensor, Tensor]:
    """Return ``(A (r, d_in), B (d_out, r))``: ``s B A`` best fits the error.

    The error is ``original - dequantised`` (both ``(d_out, d_in)``), fitted at
    rank ``r`` in float64.
    """
    error = original.double() - dequantised.double()
    a, b, _ = pissa_split(error, rank, scaling)
    return a, b


def loftq_factors(
    model: PeftModel,
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    *,
    task: str,
    num_labels: int,
    seed: int,
) -> StateDict:
    """Return the LoftQ factors of ``model`` (NF4 base, LoRA wrapped), cached.

    Also writes the digest of the dequantised adapted weights into
    ``model.config`` (``fedlora_loftq_base``), so the base fingerprint covers them.
    The full-precision weights come from the same checkpoint loaded unquantised.
    """
    from safetensors.torch import load_file, save_file

    from fedlora.presets import build_lock, cache_dir, publish

    layers = quantised_layers(model)
    digest = residual_digest({n: w for n, (w, _) in layers.items()})
    config = cast("PretrainedConfig", model.get_base_model().config)
    config.update({BASE_KEY: digest})
    key = init_key(model_cfg, adapter, task, num_labels, seed, loftq_base=digest)
    target = cache_dir() / f"loftq-{key}"
    if (target / FACTORS_FILE).exists():
        return load_file(str(target / FACTORS_FILE))
    with build_lock(target):  # one build per site: the others wait and reuse it
        if not (target / FACTORS_FILE).exists():
            factors = _fit(model, layers, model_cfg, adapter, task, num_labels, seed)

            def write(tmp: Path) -> None:
                save_file(factors, str(tmp / FACTORS_FILE), metadata={"format": "pt"})

            publish(target, write)
    return load_file(str(target / FACTORS_FILE))


def _fit(
    model: PeftModel,
    layers: dict[str, tuple[Tensor, float]],
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    task: str,
    num_labels: int,
    seed: int,
) -> StateDict:
    """Fit every adapted layer's factors to its error against the float32 model."""
    from peft import get_peft_model_state_dict

    from fedlora.models import load_base_model

    full_cfg = float32_on_cpu(model_cfg)
    full = load_base_model(full_cfg, task=task, num_labels=num_labels, seed=seed)
    originals = dict(full.named_modules())
    factors = {}
    keys = set(get_peft_model_state_dict(model))
    for name, (dequantised, scaling) in layers.items():
        module = name.removeprefix(_PREFIX)
        weight = cast(Tensor, originals[module].weight)
        a, b = loftq_split(weight, dequantised, adapter.rank, scaling)
        factors[name + A_SUFFIX] = a.contiguous()  # adapter state keys
        factors[name + B_SUFFIX] = b.contiguous()
    unknown = sorted(set(factors) - keys)
    if unknown:
        raise KeyError(f"LoftQ factors for keys not in the adapter: {unknown[:3]}")
    return factors
