"""Data for fedlora: sources, held-out split, client partitions and tokenization.

Sources (``data.source``, the keys of :data:`DATA_SOURCES`):

- ``synthetic``: sentence classification generated in code (offline default);
- ``synthetic_instruct``: instruction/response pairs generated in code (causal LM);
- ``local``: a CSV/TSV/JSONL/Parquet file at ``data.path``;
- ``hf``: ``datasets.load_dataset(data.path, data.subset, split=data.split)``.

Importing this package is cheap: ``datasets``, ``flwr_datasets`` and ``pandas`` are
imported inside the functions that use them (``DataConfig`` validation imports
:data:`DATA_SOURCES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.data import instruct, synthetic
from fedlora.data.files import load_hub, load_local
from fedlora.data.sources import DATA_SOURCES, DataSource, alpaca_prompt
from fedlora.data.split import load_heldout, load_partition, num_labels
from fedlora.data.tokenize import TokenizedDataset, make_collator

if TYPE_CHECKING:
    import datasets

    from fedlora.config import DataConfig

__all__ = [
    "DATA_SOURCES",
    "DataSource",
    "TokenizedDataset",
    "alpaca_prompt",
    "load_heldout",
    "load_partition",
    "make_collator",
    "num_labels",
]

BOTH_TASKS = ("classification", "causal_lm")


def _load_synthetic(cfg: DataConfig, seed: int) -> datasets.Dataset:
    return synthetic.generate(cfg.num_examples, cfg.num_classes, seed)


def _load_synthetic_instruct(cfg: DataConfig, seed: int) -> datasets.Dataset:
    return instruct.generate(cfg.num_examples, seed)


DATA_SOURCES.register("synthetic", DataSource(_load_synthetic, ("classification",)))
DATA_SOURCES.register(
    "synthetic_instruct", DataSource(_load_synthetic_instruct, ("causal_lm",))
)
DATA_SOURCES.register("local", DataSource(load_local, BOTH_TASKS))
DATA_SOURCES.register("hf", DataSource(load_hub, BOTH_TASKS))
