"""Server-side configuration: the ``strategy`` group and the whole experiment.

``ExperimentConfig`` is everything a run needs: the client-side groups (inherited from
``fedlora.config.ClientConfig``), the aggregation strategy and where outputs go. The
ServerApp rebuilds it from Flower's run-config with ``from_run_config``; the Hydra
launcher validates through the same class before starting anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedlora.config import ClientConfig
from fedlora.configtools import build_config, check_choice

WEIGHTINGS = ("num_examples", "uniform")


@dataclass(frozen=True)
class StrategyConfig:
    """How the server merges client adapters (Hydra group ``strategy``)."""

    name: str = field(
        default="fedavg", metadata={"help": "Aggregation strategy: fedavg."}
    )
    weighting: str = field(
        default="num_examples",
        metadata={"help": "Client weights: num_examples (data size) or uniform."},
    )

    def __post_init__(self) -> None:
        from strategies.factory import STRATEGIES

        check_choice("strategy.name", self.name, STRATEGIES.names())
        check_choice("strategy.weighting", self.weighting, WEIGHTINGS)


@dataclass(frozen=True)
class ExperimentConfig(ClientConfig):
    """A whole run: client groups + ``strategy`` + output directory."""

    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    output_dir: str = field(
        default="",
        metadata={"help": "Run directory; empty = ./outputs/flwr-run/<timestamp>."},
    )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Rebuild from Flower's flat run-config; unknown keys are errors."""
        return build_config(cls, run_config)
