"""The run directory: config.yaml, metrics.jsonl, summary.json, adapter/, checkpoints/.

Layout (one directory per run or per sweep job)::

    <run>/config.yaml        resolved experiment config
    <run>/metrics.jsonl      one JSON object per round (round 0 = before training)
    <run>/summary.json       final metrics, totals, versions, seed
    <run>/adapter/           final global adapter (PeftModel.from_pretrained loads it)
    <run>/checkpoints/round-NNN/   global adapter after round NNN + state.json
    <run>/plots/*.png        loss/accuracy and bytes per round
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from strategies.config import ExperimentConfig

# The ServerApp's last log line, once every file of the run directory is
# written; the launcher ends a simulation there (``LocalSimulation.run``).
FINISHED_LOG = "fedlora: finished; results in"

VERSIONED = (
    "fedlora",
    "flwr",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "opacus",
    "tenseal",
    "hydra-core",
)


def config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Nested plain dict of the config (tuples become lists) for YAML/JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    out: dict[str, Any] = plain(dataclasses.asdict(cfg))
    return out


def versions() -> dict[str, str]:
    """Installed versions of the packages that determine results."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunDir:
    """Writes one run's outputs under ``root`` (created if missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "checkpoints").mkdir(exist_ok=True)
        (self.root / "plots").mkdir(exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        """Path of metrics.jsonl."""
        return self.root / "metrics.jsonl"

    def write_config(self, cfg: ExperimentConfig) -> None:
        """Write the resolved config as YAML."""
        text = yaml.safe_dump(config_dict(cfg), sort_keys=False)
        (self.root / "config.yaml").write_text(text)

    def reset_metrics(self) -> None:
        """Start a fresh metrics.jsonl."""
        self.metrics_path.write_text("")

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics as a JSON line (NaN/Inf written as null)."""
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(_json_safe(row)) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """All rows of metrics.jsonl."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def checkpoint_dir(self, server_round: int) -> Path:
        """Directory of the checkpoint after ``server_round``."""
        return self.root / "checkpoints" / f"round-{server_round:03d}"

    def write_checkpoint_state(
        self, server_round: int, state: Mapping[str, Any]
    ) -> None:
        """state.json beside a checkpoint's adapter (round, strategy state)."""
        path = self.checkpoint_dir(server_round) / "state.json"
        path.write_text(
            json.dumps(_json_safe({"round": server_round, **state}), indent=2)
        )

    def finalize_adapter(self, server_round: int) -> Path:
        """Copy the last checkpoint's adapter files to ``adapter/``."""
        target = self.root / "adapter"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(
            self.checkpoint_dir(server_round),
            target,
            ignore=shutil.ignore_patterns("state.json"),
        )
        return target

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Write summary.json."""
        (self.root / "summary.json").write_text(
            json.dumps(_json_safe(summary), indent=2)
        )
