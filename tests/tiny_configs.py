"""Tiny run configs for tests: the tiny Llama base and a synthetic task.

Every test that needs a model builds its config here, stating only what it
changes, instead of repeating the same ten keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedlora.config.flat import build_config
from strategies.config import ExperimentConfig

TINY_MODEL = {"model.name": "tiny_llama", "model.tiny_hidden_size": 64}
TASKS = {
    "causal_lm": {
        "data.source": "synthetic_instruct",
        "data.task": "causal_lm",
        "data.partitioner": "iid",
    },
    "classification": {
        "data.source": "synthetic",
        "data.task": "classification",
        "data.partitioner": "iid",
    },
}


def tiny_values(task: str, overrides: Mapping[str, Any] = ()) -> dict[str, Any]:
    """Flat run-config values: tiny Llama, rank 4, ``task``'s synthetic data, IID."""
    return {**TINY_MODEL, **TASKS[task], "adapter.rank": 4, **dict(overrides)}


def tiny_config(task: str, overrides: Mapping[str, Any] = ()) -> ExperimentConfig:
    """The validated :class:`ExperimentConfig` of :func:`tiny_values`."""
    return build_config(ExperimentConfig, tiny_values(task, overrides))
