"""The aggregation strategies by name (``strategy.name``), with what each accepts.

One entry per strategy: its class (imported only when a run builds it, so
validating a config imports neither torch nor Flower), a one-line summary for help
and error texts, and whether it merges clients of different LoRA ranks. Every list
of strategy names elsewhere (CLI help, config errors) is derived from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedlora.registry import Registry

if TYPE_CHECKING:
    from strategies.config import ExperimentConfig
    from strategies.fedavg_lora import FedAvgLora


@dataclass(frozen=True)
class StrategySpec:
    """One aggregation strategy.

    Parameters
    ----------
    home : str
        ``"module:Class"`` of the strategy; the class has ``from_config(cfg)``.
    summary : str
        What the server merges, in one line (help and error texts).
    rank_aware : bool
        True if clients may train at different LoRA ranks
        (``federation.client_ranks``); such a strategy merges both factors, so it
        needs ``adapter=lora``.
    """

    home: str
    summary: str
    rank_aware: bool

    def build(self, cfg: ExperimentConfig) -> FedAvgLora:
        """Import the strategy class and instantiate it from the run's config."""
        module, cls = self.home.split(":")
        strategy: FedAvgLora = getattr(
            importlib.import_module(module), cls
        ).from_config(cfg)
        return strategy


STRATEGIES: Registry[StrategySpec] = Registry("strategy")
STRATEGIES.register(
    "fedavg",
    StrategySpec(
        "strategies.fedavg_lora:FedAvgLora",
        "FedAvg of the sent factors (FedIT)",
        rank_aware=False,
    ),
)
STRATEGIES.register(
    "hetlora",
    StrategySpec(
        "strategies.hetlora:HetLora",
        "HetLoRA: zero-pad to the maximum rank, average, truncate",
        rank_aware=True,
    ),
)
STRATEGIES.register(
    "flora",
    StrategySpec(
        "strategies.flora:Flora",
        "FLoRA: stack the clients' factors (exact), merge beside the base, restart",
        rank_aware=True,
    ),
)
STRATEGIES.register(
    "flexlora",
    StrategySpec(
        "strategies.flexlora:FlexLora",
        "FlexLoRA: average the products B A, SVD back to each client's rank",
        rank_aware=True,
    ),
)
STRATEGIES.register(
    "she_lora",
    StrategySpec(
        "strategies.she_lora:SheLora",
        "SHE-LoRA: FlexLoRA with the most sensitive columns merged under CKKS",
        rank_aware=True,
    ),
)


def rank_aware_names() -> list[str]:
    """Names of the strategies that accept clients of different ranks."""
    return [n for n in STRATEGIES.names() if STRATEGIES.get(n).rank_aware]


def build_strategy(cfg: ExperimentConfig) -> FedAvgLora:
    """Instantiate the strategy named by ``cfg.strategy.name``."""
    return STRATEGIES.get(cfg.strategy.name).build(cfg)
