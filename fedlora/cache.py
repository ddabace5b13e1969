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
from fedlora.lora.state import factor_of
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
    """A LoRA-wrapped model with its tokenizer and device."""

    model: PeftModel
    tokenizer: Any
    device: torch.device


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
    base = load_base_model(model_cfg, task=task, num_labels=num_labels, seed=seed)
    model = wrap_lora(base, model_cfg, adapter_cfg, task=task, seed=seed, rank=rank)
    return ModelBundle(model, load_tokenizer(model_cfg), resolve_device(model_cfg))


def model_bundle(cfg: ClientConfig, rank: int | None = None) -> ModelBundle:
    """Return the cached LoRA model for ``cfg`` (one per process and config)."""
    labels = (
        fdata.num_labels(cfg.data, seed=cfg.seed)
        if cfg.data.task == "classification"
        else 0
    )
    r = cfg.adapter.rank if rank is None else rank
    return _bundle(cfg.model, cfg.adapter, cfg.data.task, labels, cfg.seed, r)


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
