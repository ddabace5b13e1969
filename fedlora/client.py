"""One client's work in a round, independent of Flower (the ClientApp is glue).

``train_round`` loads the global adapter into the cached model, trains the factors
the variant selects for this round for ``federation.local_steps`` steps, and returns
only the tensors it trained. ``evaluate_round`` scores a global adapter on the
client's own data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from fedlora.adapters import StateDict, adapter_state, load_adapter_state, select
from fedlora.config import ClientConfig
from fedlora.runtime import collator, model_bundle, partition_dataset, set_trainable
from fedlora.site import SiteConfig
from fedlora.train import EvalResult, TrainResult, derive_seed, evaluate, train_local
from fedlora.variants import VARIANTS


class RoundOutcome(NamedTuple):
    """What a client sends back after local training."""

    state: StateDict  # only the tensors trained this round
    result: TrainResult
    num_examples: int  # size of the local dataset (FedAvg weight)


def for_site(cfg: ClientConfig, site: SiteConfig) -> ClientConfig:
    """Apply site overrides (device) from node-config to the run's config."""
    if site.device:
        model = dataclasses.replace(cfg.model, device=site.device)
        return dataclasses.replace(cfg, model=model)
    return cfg


def train_round(
    cfg: ClientConfig,
    site: SiteConfig,
    server_round: int,
    global_state: Mapping[str, Tensor],
) -> RoundOutcome:
    """Train locally from ``global_state`` and return the trained tensors.

    Parameters
    ----------
    server_round : int
        1-based round number from the server; drives the LR schedule, the data
        order and the variant's choice of factors (never a local counter).
    global_state : Mapping[str, Tensor]
        Every adapter tensor of the global model, PEFT state-dict keys.
    """
    cfg = for_site(cfg, site)
    bundle = model_bundle(cfg)
    load_adapter_state(bundle.model, global_state)
    factors = VARIANTS.get(cfg.adapter.variant).factors_for_round(server_round)
    set_trainable(bundle.model, factors, train_head=cfg.adapter.train_head)
    data = partition_dataset(
        cfg, site.partition_id, site.num_partitions, site.data_path
    )
    steps = cfg.federation.local_steps
    seed = derive_seed(cfg.seed, server_round, site.partition_id, "train")
    torch.manual_seed(seed)  # dropout masks
    result = train_local(
        bundle.model,
        data,
        collator(cfg),
        cfg=cfg.train,
        steps=steps,
        start_step=(server_round - 1) * steps,
        total_steps=cfg.federation.rounds * steps,
        generator=torch.Generator().manual_seed(seed),
        device=bundle.device,
    )
    state = select(adapter_state(bundle.model), factors)
    return RoundOutcome(state=state, result=result, num_examples=len(data))


def evaluate_round(
    cfg: ClientConfig, site: SiteConfig, global_state: Mapping[str, Tensor]
) -> EvalResult:
    """Evaluate the global adapter on this client's local data."""
    cfg = for_site(cfg, site)
    bundle = model_bundle(cfg)
    load_adapter_state(bundle.model, global_state)
    data = partition_dataset(
        cfg, site.partition_id, site.num_partitions, site.data_path
    )
    return evaluate(
        bundle.model,
        data,
        collator(cfg),
        task=cfg.data.task,
        batch_size=cfg.train.eval_batch_size,
        device=bundle.device,
    )
