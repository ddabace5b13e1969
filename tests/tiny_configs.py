"""Tiny run configs for tests: the tiny Llama base and a synthetic task.

Every test that needs a model builds its config here, stating only what it
changes, instead of repeating the same ten keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
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


def tiny_dp_values(overrides: Mapping[str, Any] = ()) -> dict[str, Any]:
    """A tiny classification job under ``privacy=dp``: 2 clients of 200 examples,
    3 rounds x 3 local steps, expected batch 8."""
    return tiny_values(
        "classification",
        {
            "data.num_examples": 400,
            "federation.clients": 2,
            "federation.rounds": 3,
            "federation.local_steps": 3,
            "train.batch_size": 8,
            "privacy.mode": "dp",
            **dict(overrides),
        },
    )


def tiny_config(task: str, overrides: Mapping[str, Any] = ()) -> ExperimentConfig:
    """The validated :class:`ExperimentConfig` of :func:`tiny_values`."""
    return build_config(ExperimentConfig, tiny_values(task, overrides))


def deployed_job(
    tmp_path: Path, overrides: Mapping[str, Any] = ()
) -> tuple[dict[str, Path], Path]:
    """A tiny causal-LM job for a local deployment: data files and ``run.toml``.

    Returns ``({"server": .., "site-0": .., "site-1": ..}, run_config)``; each site
    has its own JSONL file, the server's file is its held-out set, and the run
    writes to ``tmp_path / "run"`` unless ``output_dir`` is overridden.
    """
    from fedlora.data import instruct
    from simulations.experiment import write_run_config

    tmp_path.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, seed, n in (("server", 9, 60), ("site-0", 0, 120), ("site-1", 1, 120)):
        files[name] = tmp_path / f"{name}.jsonl"
        instruct.generate(n, seed).to_json(str(files[name]))
    values = {
        **TINY_MODEL,
        "data.source": "local",
        "data.path": str(files["server"]),
        "data.task": "causal_lm",
        "data.partitioner": "iid",
        "federation.clients": 2,
        "federation.rounds": 3,
        "federation.local_steps": 3,
        "train.batch_size": 4,
        "output_dir": str(tmp_path / "run"),
        **dict(overrides),
    }
    run_config = tmp_path / "run.toml"
    write_run_config(build_config(ExperimentConfig, values), run_config)
    return files, run_config


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` so far (none before it exists)."""
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
