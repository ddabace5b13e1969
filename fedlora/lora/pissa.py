"""PiSSA / FeDeRA initialisation: LoRA from the principal singular vectors of W.

PiSSA [Meng et al., NeurIPS 2024] (in federation: FeDeRA, Yan et al., 2024) splits
each adapted weight ``W (d_out, d_in) = U S V^T`` into its top-``r`` part, which
becomes the trainable factors, and a frozen residual::

    A = diag(sqrt(S_r / s)) V_r^T        (r, d_in)
    B = U_r diag(sqrt(S_r / s))          (d_out, r)
    W_res = W - s B A                    (d_out, d_in), s = the LoRA scale

so ``W_res + s B A = W`` at the start. peft does this in float32 on the loaded
weights (``init_lora_weights="pissa"``) and refuses quantised ones; in federation
every site must build the *same* residual base and factors, also under NF4. Here:

- the SVD runs in float64 on the CPU with the sign of each singular pair fixed,
  and the factors are rounded to float32 (:func:`pissa_split`): builds whose
  last float64 bits differ nearly always agree after rounding, and one that does
  not is refused by the fingerprint, not trained on silently; the residual is
  computed from the rounded factors;
- the residual model is written once per configuration into the cache
  (:func:`pissa_base`) in float32 and then loaded like any checkpoint, so NF4
  quantises the residual (peft's recipe for PiSSA with QLoRA);
- the residual's digest is written into its ``config.json``
  (``fedlora_pissa_residual``), which the base fingerprint hashes: a site whose
  residual differs from the server's is refused like a site with another base.

The trained adapter applies to the residual base; :func:`write_pissa_as_lora`
turns the saved one into a LoRA of rank ``2r`` for the *original* base (peft's
``path_initial_model_for_weight_conversion``): ``[B, -B_0] [A; A_0]``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from fedlora.lora.state import A_SUFFIX, B_SUFFIX, factor_pairs, pairs_state

if TYPE_CHECKING:
    from fedlora.config import AdapterConfig, ModelConfig

FACTORS_FILE = "pissa_factors.safetensors"  # initial A, B by adapter state key
RESIDUAL_KEY = "fedlora_pissa_residual"  # config.json entry: digest of the residual


def pissa_split(
    weight: Tensor, rank: int, scaling: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(A (r, d_in), B (d_out, r), W_res (d_out, d_in))``, float32.

    ``weight`` is ``(d_out, d_in)`` in any float dtype. The SVD is float64 on the
    CPU, with each singular pair's sign fixed (the largest entry of ``U``'s column
    positive); ``W_res = W - scaling * B A`` uses the float32 factors, so the
    model's ``W_res + scaling * B A`` equals ``W`` up to float32 rounding.
    """
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} is outside [1, {min(weight.shape)}]")
    w = weight.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, vh = u[:, :rank], vh[:rank]
    # A singular pair is defined up to its sign, which LAPACK builds may choose
    # differently: make the largest |entry| of each left vector positive.
    pivot = u.abs().argmax(dim=0)
    sign = torch.sign(u[pivot, torch.arange(rank)])
    sign[sign == 0] = 1.0
    u, vh = u * sign[None, :], vh * sign[:, None]
    root = torch.sqrt(s[:rank] / scaling)
    a = (root[:, None] * vh).float().contiguous()
    b = (u * root[None, :]).float().contiguous()
    residual = (w - scaling * (b.double() @ a.double())).float()
    return a, b, residual


def residual_digest(residuals: Mapping[str, Tensor]) -> str:
    """SHA-256 (16 hex) over the residual weights' names, shapes and bfloat16 bits."""
    digest = hashlib.sha256()
    for name in sorted(residuals):
        tensor = residuals[name].detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def init_key(
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    task: str,
    labels: int,
    seed: int,
    **extra: object,
) -> str:
    """Cache key of an SVD initialisation (16 hex): what it is computed from.

    A local checkpoint adds its weight files' names, sizes and modification
    times, so files replaced under the same path are not served a stale build.
    """
    import os

    from fedlora.models import lora_targets, weights_location

    location = weights_location(model_cfg)[0]
    files = []
    if os.path.isdir(location):
        for name in sorted(os.listdir(location)):
            if name.endswith((".safetensors", ".bin")):
                st = os.stat(os.path.join(location, name))
                files.append([name, st.st_size, st.st_mtime_ns])
    parts = {
        "weights": location,
        "files": files,
        "num_layers": model_cfg.num_layers,
        "targets": lora_targets(model_cfg, adapter),
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "rslora": adapter.use_rslora,
        "task": task,
        "labels": labels,
        "seed": seed,
        **extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def float32_on_cpu(model_cfg: ModelConfig) -> ModelConfig:
    """Return the same checkpoint unquantised, float32 on the CPU (the SVD input)."""
    from dataclasses import replace

    return replace(
        model_cfg, quantization="none", compute_dtype="float32", device="cpu"
    )


def pissa_base(
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    *,
    task: str,
    num_labels: int,
    seed: int,
) -> str:
    """Directory of the residual base of this configuration (built once, cached).

    It holds the float32 checkpoint whose adapted weights are the residuals (with
    ``fedlora_pissa_residual`` in its config) and :data:`FACTORS_FILE`, the
    initial factors by adapter state key. Processes that need it at once (the
    server's and the clients') build it once: the first holds a lock, the others
    wait for it and reuse the result.
    """
    from fedlora.presets import build_lock, cache_dir

    key = init_key(model_cfg, adapter, task, num_labels, seed)
    target = cache_dir() / f"pissa-{key}"
    if (target / FACTORS_FILE).exists():
        return str(target)
    with build_lock(target):
        if not (target / FACTORS_FILE).exists():
            _build_residual_base(target, model_cfg, adapter, task, num_labels, seed)
    return str(target)


def _build_residual_base(
    target: Path,
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    task: str,
    num_labels: int,
    seed: int,
) -> None:
    """Split every adapted weight of the float32 model; write ``target``."""
    from dataclasses import replace

    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    from fedlora.models import load_base_model, wrap_lora
    from fedlora.presets import publish

    full = float32_on_cpu(model_cfg)
    base = load_base_model(full, task=task, num_labels=num_labels, seed=seed)
    model = wrap_lora(
        base, full, replace(adapter, init="default"), task=task, seed=seed
    )
    residuals = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            scaling = float(layer.scaling["default"])
            weight = cast(Tensor, layer.get_base_layer().weight)
            a, b, res = pissa_split(weight, adapter.rank, scaling)
            cast(Tensor, layer.lora_A["default"].weight).copy_(a)
            cast(Tensor, layer.lora_B["default"].weight).copy_(b)
            weight.copy_(res)
            residuals[name] = res
    factors = {
        k: v.detach().contiguous()
        for k, v in get_peft_model_state_dict(model).items()
        if k.endswith((A_SUFFIX, B_SUFFIX))
    }
    plain = model.unload()  # the LoRA layers removed, not merged: W_res stays
    plain.config.update({RESIDUAL_KEY: residual_digest(residuals)})

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        save_file(factors, str(tmp / FACTORS_FILE), metadata={"format": "pt"})

    publish(target, write)


def initial_factors(location: str) -> dict[str, Tensor]:
    """Return the initial ``A``, ``B`` of a residual base (adapter state keys)."""
    from safetensors.torch import load_file

    return load_file(str(Path(location) / FACTORS_FILE))


def export_for_original_base(
    path: Any,
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    initial: Mapping[str, Tensor],
) -> None:
    """Make a saved PiSSA adapter apply to the original base; others stay.

    With ``adapter.init == "pissa"`` this is :func:`write_pissa_as_lora`.
    """
    if adapter.init != "pissa":
        return
    from fedlora.models import weights_location

    scale = 2**0.5 if adapter.use_rslora else 2.0
    write_pissa_as_lora(path, initial, scale, weights_location(model_cfg)[0])


def write_pissa_as_lora(
    path: Any, initial: Mapping[str, Tensor], alpha_scale: float, base: str
) -> int:
    """Rewrite a saved PiSSA adapter as a LoRA of the original base; return ``2r``.

    ``path`` holds the adapter trained on the residual base (factors ``B, A``);
    ``initial`` holds ``B_0, A_0``. Every matrix becomes ``B' = [B | -B_0]``,
    ``A' = [A; A_0]``, so ``s B' A' = s B A - s B_0 A_0`` and ``W + s B' A' =
    W_res + s B A``. ``r`` doubles and ``lora_alpha`` is multiplied by
    ``alpha_scale`` (2, or sqrt 2 with rsLoRA) so the scale ``s`` is unchanged.
    ``base`` (the original checkpoint) replaces the residual base's cache path as
    ``base_model_name_or_path`` and in the model card, so ``AutoPeftModel`` loads
    the base the adapter now belongs to.
    """
    from safetensors.torch import load_file, save_file

    root = Path(path)
    weights = load_file(str(root / "adapter_model.safetensors"))
    start = factor_pairs(initial)
    merged = {}
    for name, (b, a) in factor_pairs(weights).items():
        b0, a0 = start[name]
        merged[name] = (torch.cat([b, -b0], dim=1), torch.cat([a, a0], dim=0))
    weights.update({k: v.contiguous() for k, v in pairs_state(merged).items()})
    save_file(
        weights, str(root / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    config_path = root / "adapter_config.json"
    config = json.loads(config_path.read_text())
    rank = 2 * int(config["r"])
    alpha = config["lora_alpha"] * alpha_scale
    residual_base = str(config.get("base_model_name_or_path") or "")
    config.update(
        {
            "r": rank,
            "lora_alpha": alpha,
            "init_lora_weights": True,
            "base_model_name_or_path": base,
        }
    )
    config_path.write_text(json.dumps(config, indent=2))
    card = root / "README.md"
    if residual_base and card.exists():
        card.write_text(card.read_text().replace(residual_base, base))
    return rank
