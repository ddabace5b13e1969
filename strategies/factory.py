"""Registry of aggregation strategies: name -> builder from the experiment config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from fedlora.registry import Registry

if TYPE_CHECKING:
    from strategies.config import ExperimentConfig
    from strategies.fedavg_lora import FedAvgLora

Builder = Callable[["ExperimentConfig"], "FedAvgLora"]
STRATEGIES: Registry[Builder] = Registry("strategy")


def _fedavg(cfg: ExperimentConfig) -> FedAvgLora:
    from strategies.fedavg_lora import FedAvgLora

    return FedAvgLora.from_config(cfg)


def _hetlora(cfg: ExperimentConfig) -> FedAvgLora:
    from strategies.hetlora import HetLora

    return HetLora.from_config(cfg)


def _flora(cfg: ExperimentConfig) -> FedAvgLora:
    from strategies.flora import Flora

    return Flora.from_config(cfg)


def _flexlora(cfg: ExperimentConfig) -> FedAvgLora:
    from strategies.flexlora import FlexLora

    return FlexLora.from_config(cfg)


def _she_lora(cfg: ExperimentConfig) -> FedAvgLora:
    from strategies.she_lora import SheLora

    return SheLora.from_config(cfg)


STRATEGIES.register("fedavg", _fedavg)
STRATEGIES.register("hetlora", _hetlora)
STRATEGIES.register("flora", _flora)
STRATEGIES.register("flexlora", _flexlora)
STRATEGIES.register("she_lora", _she_lora)


def build_strategy(cfg: ExperimentConfig) -> FedAvgLora:
    """Instantiate the strategy named by ``cfg.strategy.name``."""
    return STRATEGIES.get(cfg.strategy.name)(cfg)
