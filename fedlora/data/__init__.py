"""Data for fedlora: sources, held-out split, client partitions and tokenization.

Sources (``data.source``, the keys of :data:`DATA_SOURCES`):

- ``synthetic``: sentence classification generated in code (offline default);
- ``synthetic_instruct``: instruction/response pairs generated in code (causal LM);
- ``local``: a CSV/TSV/JSONL/Parquet file at ``data.path``;
- ``hf``: ``datasets.load_dataset(data.path, data.subset, split=data.split)``.

Every source returns :class:`~fedlora.data.rows.Rows` (plain columns). Importing
this package is cheap: ``datasets`` (Hub sources, Dirichlet partitions),
``flwr_datasets``, ``pandas`` (local files) and torch are imported where they are
used (``DataConfig`` validation imports :data:`DATA_SOURCES`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedlora.data import instruct, synthetic
from fedlora.data.files import load_hub, load_local
from fedlora.data.rows import Rows
from fedlora.data.sources import DATA_SOURCES, TASKS, DataSource, alpaca_prompt
from fedlora.data.split import load_heldout, load_partition, num_labels

if TYPE_CHECKING:
    from fedlora.config import DataConfig
    from fedlora.data.tokenize import TokenizedDataset, make_collator

# Tokenization needs torch: loaded on first use (PEP 562), so that importing the
# registry of sources for config validation does not import torch.
_LAZY = {"TokenizedDataset": "tokenize", "make_collator": "tokenize"}


def __getattr__(name: str) -> Any:
    """Load ``name`` from its submodule on first access."""
    home = _LAZY.get(name)
    if home is None:
        raise AttributeError(f"module 'fedlora.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlora.data.{home}"), name)


__all__ = [
    "DATA_SOURCES",
    "DataSource",
    "Rows",
    "TokenizedDataset",
    "alpaca_prompt",
    "load_heldout",
    "load_partition",
    "make_collator",
    "num_labels",
]

BOTH_TASKS = TASKS


def _load_synthetic(cfg: DataConfig, seed: int) -> Rows:
    return synthetic.generate(cfg.num_examples, cfg.num_classes, seed)


def _load_synthetic_instruct(cfg: DataConfig, seed: int) -> Rows:
    return instruct.generate(cfg.num_examples, seed, cfg.prompt_format)


DATA_SOURCES.register("synthetic", DataSource(_load_synthetic, ("classification",)))
DATA_SOURCES.register(
    "synthetic_instruct", DataSource(_load_synthetic_instruct, ("causal_lm",))
)
DATA_SOURCES.register("local", DataSource(load_local, BOTH_TASKS))
DATA_SOURCES.register("hf", DataSource(load_hub, BOTH_TASKS))
