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
from fedlora.config.flat import ConfigError, build_config, check_choice, check_range
from strategies.registry import STRATEGIES, rank_aware_names

WEIGHTINGS = ("num_examples", "uniform")


# Variants whose clients train and send both factors every round: a server step
# (momentum, server_lr) may move both without touching a factor frozen that round.
SERVER_STEP = ("lora", "la_lora")


@dataclass(frozen=True)
class StrategyConfig:
    """How the server merges client adapters (Hydra group ``strategy``)."""

    name: str = field(
        default="fedavg",
        metadata={
            "help": "Aggregation: "
            + "; ".join(f"{n}: {STRATEGIES.get(n).summary}" for n in STRATEGIES)
        },
    )
    weighting: str = field(
        default="num_examples",
        metadata={"help": "Client weights: num_examples (data size) or uniform."},
    )
    norm_weighting: bool = field(
        default=True,
        metadata={"help": "hetlora: also weight clients by ||s B A||_F."},
    )
    server_momentum: float = field(
        default=0.0,
        metadata={
            "help": "fedavg: server momentum beta (FedAvgM, Hsu et al. 2019): the "
            "global adapter moves by server_lr * v, v = beta * v + (average - global); "
            "0 = plain FedAvg. Damps client drift under label skew."
        },
    )
    server_lr: float = field(
        default=1.0,
        metadata={"help": "fedavg: server learning rate of that step (1 = FedAvg)."},
    )
    he_budgets: tuple[int, ...] = field(
        default=(4,),
        metadata={
            "help": "she_lora: encrypted columns per adapted matrix per client "
            "(client i gets entry i mod len; a site's node-config he-budget wins)."
        },
    )
    he_public_context: str = field(
        default="",
        metadata={
            "help": "she_lora: the server's public CKKS context file; empty = the "
            "simulation launcher creates a key pair in <output_dir>/he-keys."
        },
    )
    he_secret_context: str = field(
        default="",
        metadata={
            "help": "she_lora, simulation only: the clients' secret context file "
            "(a site's node-config he-secret-context wins; never sent to the server)."
        },
    )

    def __post_init__(self) -> None:
        check_choice("strategy.name", self.name, STRATEGIES.names())
        check_choice("strategy.weighting", self.weighting, WEIGHTINGS)
        check_range(
            "strategy.server_momentum", self.server_momentum, low=0, high=1,
            high_open=True,
        )  # fmt: skip
        check_range("strategy.server_lr", self.server_lr, low=0, low_open=True)
        for i, k in enumerate(self.he_budgets):
            if k < 0:
                raise ConfigError(
                    f"strategy.he_budgets[{i}]={k}: a column budget must be >= 0"
                )


@dataclass(frozen=True)
class ExperimentConfig(ClientConfig):
    """A whole run: client groups + ``strategy`` + output directory."""

    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    output_dir: str = field(
        default="",
        metadata={"help": "Run directory; empty = ./outputs/flwr-run/<timestamp>."},
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue the run in output_dir from its last complete "
            "checkpoint (python -m simulations.resume <run dir>)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        ranks = set(self.federation.client_ranks) | {self.adapter.rank}
        rank_aware = rank_aware_names()
        if len(ranks) > 1 and self.strategy.name not in rank_aware:
            raise ConfigError(
                f"federation.client_ranks={list(self.federation.client_ranks)} gives "
                f"clients different LoRA ranks (adapter.rank={self.adapter.rank} is "
                f"the global one), which strategy={self.strategy.name} cannot merge; "
                f"use strategy={' | '.join(rank_aware)}"
            )
        if self.strategy.name in rank_aware and self.adapter.variant != "lora":
            raise ConfigError(
                f"strategy={self.strategy.name} merges both factors of every client; "
                f"adapter={self.adapter.variant} trains or sends one only. Use "
                "adapter=lora"
            )
        if self.adapter.use_dora and self.strategy.name != "fedavg":
            raise ConfigError(
                f"adapter.use_dora=true with strategy={self.strategy.name}: DoRA "
                "normalises each row of W + s B A by its own norm, so zero-padded, "
                "stacked or re-factorised ranks (hetlora, flora, flexlora) and "
                "encrypted B columns (she_lora) have no DoRA counterpart; use "
                "strategy=fedavg"
            )
        if self.adapter.init != "default" and self.strategy.name != "fedavg":
            raise ConfigError(
                f"adapter.init={self.adapter.init} with strategy="
                f"{self.strategy.name}: the SVD initialisation (and PiSSA's residual "
                "base W - s B A) is made for one rank, and the rank-aware strategies "
                "and SHE-LoRA merge adapters of several ranks; use strategy=fedavg"
            )
        if self.adapter.peft_type == "vera" and self.strategy.name != "fedavg":
            raise ConfigError(
                f"adapter.peft_type=vera with strategy={self.strategy.name}: VeRA "
                "sends vectors over projections every site shares, so there are no "
                "per-client ranks to pad, stack or re-factorise (hetlora, flora, "
                "flexlora) and no A columns to encrypt (she_lora); use "
                "strategy=fedavg"
            )
        plain = self.strategy.server_momentum == 0 and self.strategy.server_lr == 1
        if not plain and (
            self.strategy.name != "fedavg" or self.adapter.variant not in SERVER_STEP
        ):
            raise ConfigError(
                f"strategy.server_momentum={self.strategy.server_momentum} / "
                f"server_lr={self.strategy.server_lr} move both LoRA factors every "
                f"round: they need strategy=fedavg and adapter in {list(SERVER_STEP)}, "
                f"not strategy={self.strategy.name}, adapter={self.adapter.variant} "
                "(a factor frozen that round would still move)"
            )
        if self.resume and not self.output_dir:
            raise ConfigError(
                "resume=true needs output_dir=<the run directory to continue>"
            )
        if self.strategy.name == "she_lora" and self.federation.fraction_evaluate == 0:
            raise ConfigError(
                "strategy=she_lora: the server cannot decrypt the merged update, so "
                "only the clients can evaluate it; set federation.fraction_evaluate "
                "> 0 (e.g. 1.0)"
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ExperimentConfig:
        """Rebuild from Flower's flat run-config; unknown keys are errors."""
        return build_config(cls, run_config)
