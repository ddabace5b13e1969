"""Typed, validated configuration of the client side (one dataclass per Hydra group).

Each dataclass mirrors one ``conf/<group>/`` directory and one prefix of Flower's flat
run-config (``model.*``, ``data.*``, ...). Validation happens in ``__post_init__`` so a
bad value fails before any model or dataset is loaded, with a message naming the key,
the value and what is allowed. ``ClientConfig.from_run_config`` is the one function the
ClientApp uses to rebuild everything from ``context.run_config``. The ``data`` group
lives in ``fedlora.config.data``, ``adapter`` in ``fedlora.config.adapter``,
``privacy`` in ``fedlora.config.privacy``, and the flat run-config tools in
``fedlora.config.flat``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedlora.config.adapter import AdapterConfig
from fedlora.config.data import DataConfig
from fedlora.config.flat import (
    ConfigError,
    build_config,
    check_choice,
    check_range,
    field_help,
)
from fedlora.config.privacy import PrivacyConfig
from fedlora.presets import MODEL_PRESETS
from fedlora.protocol import TRANSPORT_DTYPES

__all__ = [
    "AdapterConfig",
    "ClientConfig",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "TrainConfig",
]

QUANTIZATIONS = ("none", "nf4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SCHEDULERS = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ModelConfig:
    """Frozen base model and how it is loaded (Hydra group ``model``)."""

    name: str = field(
        default="minilm",
        metadata=field_help(
            f"Preset ({', '.join(MODEL_PRESETS.names())}), a Hugging Face model id "
            "or a local directory."
        ),
    )
    quantization: str = field(
        default="nf4",
        metadata=field_help(
            "Base weights: none (unquantised, stored in compute_dtype), "
            "nf4 (QLoRA), int8."
        ),
    )
    compute_dtype: str = field(
        default="float32",
        metadata=field_help(
            "Compute dtype of the 4-bit layers, and the weights' dtype with "
            "quantization=none; float32 is exact on CPU."
        ),
    )
    double_quant: bool = field(
        default=True,
        metadata=field_help("NF4 double quantisation of the block scales."),
    )
    device: str = field(
        default="auto", metadata=field_help("auto (cuda if available), cpu or cuda.")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=field_help("Trade compute for activation memory.")
    )
    tiny_hidden_size: int = field(
        default=128, metadata=field_help("tiny_llama preset: hidden size.")
    )
    tiny_layers: int = field(
        default=2, metadata=field_help("tiny_llama preset: layers.")
    )
    num_layers: int = field(
        default=0,
        metadata=field_help(
            "Keep only the first N transformer layers of the checkpoint (0 = all): "
            "a cheaper pretrained base for experiments on small machines."
        ),
    )

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("model.name is empty; give a preset, model id or path")
        check_choice("model.quantization", self.quantization, QUANTIZATIONS)
        check_choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("model.device", self.device, DEVICES)
        check_range("model.tiny_hidden_size", self.tiny_hidden_size, low=8)
        check_range("model.tiny_layers", self.tiny_layers, low=1)
        check_range("model.num_layers", self.num_layers, low=0)


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation on each client (Hydra group ``train``)."""

    lr: float = field(default=2e-3, metadata=field_help("AdamW peak learning rate."))
    batch_size: int = field(
        default=16, metadata=field_help("Examples per micro-batch.")
    )
    grad_accum: int = field(
        default=1, metadata=field_help("Micro-batches accumulated per optimizer step.")
    )
    weight_decay: float = field(default=0.0, metadata=field_help("AdamW weight decay."))
    scheduler: str = field(
        default="constant",
        metadata=field_help(
            "LR schedule over the run's global steps: constant/linear/cosine."
        ),
    )
    warmup_steps: int = field(
        default=0, metadata=field_help("Linear warm-up (global steps).")
    )
    max_grad_norm: float = field(
        default=1.0, metadata=field_help("Clip the batch gradient norm; 0 disables.")
    )
    eval_batch_size: int = field(
        default=64, metadata=field_help("Evaluation batch size.")
    )
    eval_generate: int = field(
        default=0,
        metadata=field_help(
            "Causal LM: greedy-decode this many held-out prompts at every evaluation "
            "and score exact match and ROUGE-L (0 = loss and perplexity only)."
        ),
    )
    max_new_tokens: int = field(
        default=32, metadata=field_help("Cap on the length of a generated answer.")
    )
    logit_adjustment: float = field(
        default=0.0,
        metadata=field_help(
            "Classification under label skew: train on logits + tau * log(local "
            "label prior) (logit-adjusted loss, Menon et al. 2021); tau here, 0 = off."
        ),
    )

    def __post_init__(self) -> None:
        check_range("train.lr", self.lr, low=0, low_open=True)
        check_range("train.batch_size", self.batch_size, low=1)
        check_range("train.grad_accum", self.grad_accum, low=1)
        check_range("train.weight_decay", self.weight_decay, low=0)
        check_choice("train.scheduler", self.scheduler, SCHEDULERS)
        check_range("train.warmup_steps", self.warmup_steps, low=0)
        check_range("train.max_grad_norm", self.max_grad_norm, low=0)
        check_range("train.eval_batch_size", self.eval_batch_size, low=1)
        check_range("train.eval_generate", self.eval_generate, low=0)
        check_range("train.max_new_tokens", self.max_new_tokens, low=1)
        check_range("train.logit_adjustment", self.logit_adjustment, low=0)


@dataclass(frozen=True)
class FederationConfig:
    """Clients, rounds and participation (Hydra group ``federation``)."""

    clients: int = field(
        default=8, metadata=field_help("Number of clients (partitions).")
    )
    rounds: int = field(default=7, metadata=field_help("Server rounds."))
    fraction_train: float = field(
        default=1.0,
        metadata=field_help("Share of available clients sampled per round."),
    )
    fraction_evaluate: float = field(
        default=0.0,
        metadata=field_help("Share of clients doing federated evaluation (0 = off)."),
    )
    min_clients: int = field(
        default=2, metadata=field_help("Minimum replies for a round to count.")
    )
    local_steps: int = field(
        default=20, metadata=field_help("Optimizer steps per client per round.")
    )
    round_timeout: float = field(
        default=3600.0, metadata=field_help("Seconds to wait for replies in a round.")
    )
    client_ranks: tuple[int, ...] = field(
        default=(),
        metadata=field_help(
            "LoRA rank per client (client i gets entry i mod len), each <= "
            "adapter.rank, the global maximum; empty = every client uses adapter.rank."
        ),
    )
    transport_dtype: str = field(
        default="float32",
        metadata=field_help(
            "Element type of the adapter tensors on the wire, both ways: float32 "
            "(exact), bfloat16 or float16 (half the bytes, rounded once per "
            "message); the server aggregates in float32 either way."
        ),
    )

    def __post_init__(self) -> None:
        check_range("federation.clients", self.clients, low=1)
        check_range("federation.rounds", self.rounds, low=1)
        check_range(
            "federation.fraction_train",
            self.fraction_train,
            low=0,
            high=1,
            low_open=True,
        )
        check_range(
            "federation.fraction_evaluate", self.fraction_evaluate, low=0, high=1
        )
        check_range("federation.min_clients", self.min_clients, low=1)
        check_range("federation.local_steps", self.local_steps, low=1)
        check_range(
            "federation.round_timeout", self.round_timeout, low=0, low_open=True
        )
        for i, r in enumerate(self.client_ranks):
            check_range(f"federation.client_ranks[{i}]", r, low=1)
        check_choice(
            "federation.transport_dtype", self.transport_dtype, TRANSPORT_DTYPES
        )
        if self.min_clients > self.clients:
            raise ConfigError(
                f"federation.min_clients={self.min_clients} exceeds "
                f"federation.clients={self.clients}; lower min_clients"
            )


# Prefixes (dataclass field names) the client reads from the run-config.
CLIENT_GROUPS = ("seed", "model", "data", "adapter", "train", "federation", "privacy")


def resolve_prompt_format(data: DataConfig, model: ModelConfig) -> DataConfig:
    """``data.prompt_format=auto`` -> ``chat`` for chat presets, else ``alpaca``."""
    if data.prompt_format != "auto":
        return data
    chat = model.name in MODEL_PRESETS and MODEL_PRESETS.get(model.name).chat
    return replace(data, prompt_format="chat" if chat else "alpaca")


@dataclass(frozen=True)
class ClientConfig:
    """Everything a client needs: the client-side groups plus the seed."""

    seed: int = field(
        default=0, metadata=field_help("Seed for data, init and sampling.")
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def rank_of(self, partition_id: int) -> int:
        """LoRA rank of simulated client ``partition_id`` (deterministic)."""
        ranks = self.federation.client_ranks
        return ranks[partition_id % len(ranks)] if ranks else self.adapter.rank

    def __post_init__(self) -> None:
        if self.data.prompt_format == "auto":
            # Resolved once here, so the flat run config that reaches every site
            # carries the concrete format (frozen dataclass: set through object).
            object.__setattr__(
                self, "data", resolve_prompt_format(self.data, self.model)
            )
        if self.model.name in MODEL_PRESETS:
            tasks = MODEL_PRESETS.get(self.model.name).tasks
            if self.data.task not in tasks:
                raise ConfigError(
                    f"model.name={self.model.name!r} supports data.task in "
                    f"{list(tasks)}, not {self.data.task!r}; pick another model or data"
                )
        above = [r for r in self.federation.client_ranks if r > self.adapter.rank]
        if above:
            raise ConfigError(
                f"federation.client_ranks={list(self.federation.client_ranks)} has "
                f"ranks {above} above adapter.rank={self.adapter.rank}, the global "
                f"(maximum) rank; set adapter.rank={max(above)} or lower those ranks"
            )
        if self.adapter.init == "loftq" and self.model.quantization != "nf4":
            raise ConfigError(
                f"adapter.init=loftq with model.quantization={self.model.quantization}"
                ": LoftQ fits the factors to the NF4 quantisation error; use "
                "model.quantization=nf4, or adapter.init=pissa for a full-precision "
                "base"
            )
        if self.privacy.mode == "dp":
            if self.adapter.use_dora:
                raise ConfigError(
                    "privacy.mode='dp' with adapter.use_dora=true: Opacus computes no "
                    "per-sample gradient for DoRA's magnitude (peft's DoraLinearLayer "
                    "takes the LoRA factors as keyword arguments, which its hooks do "
                    "not see); use DoRA without DP, or DP with plain LoRA"
                )
            if self.adapter.peft_type == "vera" and self.adapter.dropout > 0:
                raise ConfigError(
                    "privacy.mode='dp' with adapter.peft_type=vera and "
                    f"adapter.dropout={self.adapter.dropout}: VeRA's per-sample "
                    "gradient rule reads the layer's input and cannot see the "
                    "dropout mask; set "
                    "adapter.dropout=0 (the default)"
                )
            if self.model.gradient_checkpointing:
                raise ConfigError(
                    "privacy.mode='dp' with model.gradient_checkpointing=true: Opacus "
                    "gets no per-sample gradients through checkpointed layers; set "
                    "model.gradient_checkpointing=false"
                )
            if self.train.grad_accum != 1:
                raise ConfigError(
                    f"privacy.mode='dp' with train.grad_accum={self.train.grad_accum}: "
                    "a DP-SGD step is one Poisson batch; use train.batch_size instead"
                )
        if self.train.logit_adjustment and (
            self.data.task != "classification" or self.privacy.mode == "dp"
        ):
            raise ConfigError(
                f"train.logit_adjustment={self.train.logit_adjustment} needs "
                "data.task='classification' and privacy.mode='none' (the local label "
                "prior is a statistic of the raw data that DP-SGD does not account "
                f"for); got data.task={self.data.task!r}, "
                f"privacy.mode={self.privacy.mode!r}"
            )
        if self.data.source == "synthetic" and self.data.task != "classification":
            raise ConfigError(
                "data.source='synthetic' is a classification task; use "
                "data.source='synthetic_instruct' for causal_lm"
            )
        if self.data.source == "synthetic_instruct" and self.data.task != "causal_lm":
            raise ConfigError(
                "data.source='synthetic_instruct' is a causal_lm task; set "
                "data.task=causal_lm"
            )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ClientConfig:
        """Rebuild from Flower's flat run-config (keys of other groups ignored)."""
        own = {k: v for k, v in run_config.items() if k.split(".")[0] in CLIENT_GROUPS}
        return build_config(cls, own)
