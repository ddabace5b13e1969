"""Build and cache what a process needs to train or evaluate: model, tokenizer, data.

Loading a base model costs seconds, so each process (Ray actor, ServerApp, test)
builds it once per configuration with ``functools.lru_cache`` on frozen config
dataclasses, and every round only swaps the adapter tensors in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from fedlora import data as fdata
from fedlora.config import AdapterConfig, ClientConfig, DataConfig, ModelConfig
from fedlora.lora.state import (
    StateDict,
    adapter_state,
    factor_of,
    load_adapter_state,
)
from fedlora.models import (
    load_base_model,
    load_tokenizer,
    resolve_device,
    wrap_lora,
)
from fedlora.train import Collate

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class ModelBundle:
    """A LoRA-wrapped model with its tokenizer and device.

    ``initial`` is a float32 CPU copy of the adapter as built (A from the seed, B
    zero; ``adapter_state`` keys): the run's initial global adapter, whatever
    this process trained on ``model`` since.
    """

    model: PeftModel
    tokenizer: Any
    device: torch.device
    initial: StateDict


_BUILDS = 0  # base models built by this process (the site worker reports it)


def model_builds() -> int:
    """How many base models this process has loaded and wrapped so far."""
    return _BUILDS


@lru_cache(maxsize=4)
def _bundle(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    task: str,
    num_labels: int,
    seed: int,
    rank: int,
) -> ModelBundle:
    global _BUILDS
    _BUILDS += 1
    residual = pissa_location(model_cfg, adapter_cfg, task, num_labels, seed, rank)
    base = load_base_model(
        model_cfg, task=task, num_labels=num_labels, seed=seed, location=residual
    )
    model = wrap_lora(base, model_cfg, adapter_cfg, task=task, seed=seed, rank=rank)
    factors: StateDict = {}
    if residual is not None:
        from fedlora.lora.pissa import initial_factors

        factors = initial_factors(residual)
    elif adapter_cfg.init == "loftq":
        from fedlora.lora.loftq import loftq_factors

        factors = loftq_factors(
            model, model_cfg, adapter_cfg, task=task, num_labels=num_labels, seed=seed
        )
    if factors:  # the whole state: peft cannot load a trained head's absence
        load_adapter_state(model, {**adapter_state(model), **factors})
    tokenizer, device = load_tokenizer(model_cfg), resolve_device(model_cfg)
    return ModelBundle(model, tokenizer, device, adapter_state(model))


def pissa_location(
    model_cfg: ModelConfig,
    adapter_cfg: AdapterConfig,
    task: str,
    num_labels: int,
    seed: int,
    rank: int,
) -> str | None:
    """PiSSA's residual base directory for this model (None without PiSSA).

    Raises
    ------
    ValueError
        For a rank other than ``adapter.rank``: each rank has its own residual.
    """
    if adapter_cfg.init != "pissa":
        return None
    if rank != adapter_cfg.rank:
        raise ValueError(
            f"adapter.init=pissa builds the residual base for adapter.rank="
            f"{adapter_cfg.rank}; this client's rank is {rank}"
        )
    from fedlora.lora.pissa import pissa_base

    return pissa_base(
        model_cfg, adapter_cfg, task=task, num_labels=num_labels, seed=seed
    )


def initial_pissa_factors(cfg: ClientConfig) -> StateDict:
    """Return the run's initial PiSSA factors (empty without PiSSA), from the cache."""
    from fedlora.lora.pissa import initial_factors

    labels = _labels(cfg)
    args = (cfg.model, cfg.adapter, cfg.data.task, labels, cfg.seed, cfg.adapter.rank)
    location = pissa_location(*args)
    return initial_factors(location) if location else {}


def model_bundle(cfg: ClientConfig, rank: int | None = None) -> ModelBundle:
    """Return the cached LoRA model for ``cfg`` (one per process and config)."""
    r = cfg.adapter.rank if rank is None else rank
    return _bundle(cfg.model, cfg.adapter, cfg.data.task, _labels(cfg), cfg.seed, r)


def build_model_bundle(cfg: ClientConfig) -> ModelBundle:
    """Build the LoRA model of ``cfg`` without caching it (freed after use)."""
    args = (cfg.model, cfg.adapter, cfg.data.task, _labels(cfg), cfg.seed)
    return _bundle.__wrapped__(*args, cfg.adapter.rank)


def _labels(cfg: ClientConfig) -> int:
    if cfg.data.task != "classification":
        return 0
    return fdata.num_labels(cfg.data, seed=cfg.seed)


def set_trainable(model: PeftModel, factors: frozenset[str], train_head: bool) -> None:
    """Enable grads on the given LoRA factors (and the head), freeze the rest."""
    for name, param in model.named_parameters():
        factor = factor_of(name)
        if factor is not None:
            param.requires_grad_(factor in factors)
        elif "modules_to_save" in name:
            param.requires_grad_(train_head)
        else:
            param.requires_grad_(False)


@lru_cache(maxsize=8)
def _tokenized(
    data_cfg: DataConfig,
    model_cfg: ModelConfig,
    seed: int,
    partition: tuple[int, int] | None,
    path_override: str,
) -> fdata.TokenizedDataset:
    tokenizer = load_tokenizer(model_cfg)
    if partition is None:
        ds = fdata.load_heldout(data_cfg, seed=seed)
    else:
        ds = fdata.load_partition(
            data_cfg,
            seed=seed,
            partition_id=partition[0],
            num_partitions=partition[1],
            path_override=path_override,
        )
    return fdata.TokenizedDataset(ds, tokenizer, data_cfg)


def partition_dataset(
    cfg: ClientConfig, partition_id: int, num_partitions: int, path_override: str = ""
) -> fdata.TokenizedDataset:
    """Tokenized training data of one client (cached)."""
    return _tokenized(
        cfg.data, cfg.model, cfg.seed, (partition_id, num_partitions), path_override
    )


def heldout_dataset(cfg: ClientConfig) -> fdata.TokenizedDataset:
    """Tokenized held-out split for centralised evaluation (cached)."""
    return _tokenized(cfg.data, cfg.model, cfg.seed, None, "")


def collator(cfg: ClientConfig) -> Collate:
    """Batch collator for the configured model and task."""
    return fdata.make_collator(load_tokenizer(cfg.model), cfg.data.task)
