"""One client's work in a round, independent of Flower (the ClientApp is glue).

``train_round`` loads the global adapter into the cached model, trains the factors
the variant selects for this round for ``federation.local_steps`` steps, and returns
only the tensors it trained. ``evaluate_round`` scores a global adapter on the
client's own data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from fedlora.cache import collator, model_bundle, partition_dataset, set_trainable
from fedlora.client.site import SiteConfig
from fedlora.config import ClientConfig
from fedlora.config.flat import ConfigError
from fedlora.generation import with_generation
from fedlora.lora.residual import Residual, set_residual
from fedlora.lora.state import (
    A_SUFFIX,
    VERA_D,
    StateDict,
    adapter_state,
    fingerprint,
    load_adapter_state,
    select,
)
from fedlora.lora.variants import VARIANTS
from fedlora.train import (
    Batch,
    EvalResult,
    TrainResult,
    derive_seed,
    evaluate,
    logit_adjustment,
    step_rule,
    train_local,
)

if TYPE_CHECKING:
    from fedlora.dp import PrivacyLedger
    from fedlora.protocol import PrivacyReport


class RoundOutcome(NamedTuple):
    """What a client sends back after local training."""

    state: StateDict  # only the tensors trained this round (empty: budget spent)
    result: TrainResult
    num_examples: int  # size of the local dataset (FedAvg weight)
    privacy: PrivacyReport | None = None  # privacy=dp only


def site_rank(cfg: ClientConfig, site: SiteConfig) -> int:
    """Return the site's LoRA rank: node-config ``rank``, else ``client_ranks``."""
    rank = site.rank or cfg.rank_of(site.partition_id)
    if rank > cfg.adapter.rank:
        raise ConfigError(
            f"this site's LoRA rank {rank} exceeds adapter.rank={cfg.adapter.rank}, "
            "the run's global (maximum) rank; lower node-config rank or raise "
            "adapter.rank on the server"
        )
    return rank


def for_site(cfg: ClientConfig, site: SiteConfig) -> ClientConfig:
    """Apply site overrides (device, base-model path, rank) from node-config."""
    if site.device or site.model_path:
        model = dataclasses.replace(
            cfg.model,
            device=site.device or cfg.model.device,
            name=site.model_path or cfg.model.name,
        )
        cfg = dataclasses.replace(cfg, model=model)
    rank = site_rank(cfg, site)
    if rank != cfg.adapter.rank:
        adapter = dataclasses.replace(cfg.adapter, rank=rank)
        federation = dataclasses.replace(cfg.federation, client_ranks=())
        cfg = dataclasses.replace(cfg, adapter=adapter, federation=federation)
    return cfg


def check_rank(cfg: ClientConfig, received: Mapping[str, Tensor]) -> None:
    """Refuse factors of another rank with a message that names the fix."""
    for key, tensor in received.items():
        rank_axis = key.endswith(A_SUFFIX) or key.endswith(f".{VERA_D}")  # (r, ...)
        if rank_axis and tensor.shape[0] != cfg.adapter.rank:
            raise ValueError(
                f"the server sent rank-{tensor.shape[0]} LoRA factors but this site "
                f"trains at rank {cfg.adapter.rank} (node-config rank / "
                "federation.client_ranks). strategy=fedavg needs one rank everywhere; "
                "mixed ranks need a strategy registered with rank_aware=True in "
                "strategies/registry.py"
            )


def train_round(
    cfg: ClientConfig,
    site: SiteConfig,
    server_round: int,
    global_state: Mapping[str, Tensor],
    frozen_fingerprint: str = "",
    ledger: PrivacyLedger | None = None,
    residual: Residual | None = None,
) -> RoundOutcome:
    """Train locally from ``global_state`` and return the trained tensors.

    Parameters
    ----------
    server_round : int
        1-based round number from the server; drives the LR schedule, the data
        order and the variant's choice of factors (never a local counter).
    global_state : Mapping[str, Tensor]
        The adapter tensors the server sent (PEFT state-dict keys); tensors it
        did not send (FFA-LoRA's A) stay at this client's shared initialisation.
    frozen_fingerprint : str
        The server's fingerprint of the tensors it did not send ("" = no check).
    ledger : PrivacyLedger | None
        The client's cumulative DP ledger (required with ``privacy=dp``; updated
        in place).
    residual : Residual | None
        FLoRA: the server's merged update, a frozen delta beside the base.
    """
    cfg = for_site(cfg, site)
    check_rank(cfg, global_state)
    bundle = model_bundle(cfg)
    set_residual(bundle.model, residual or {})
    load_adapter_state(bundle.model, global_state)
    check_frozen(bundle.model, global_state, frozen_fingerprint)
    if cfg.privacy.mode == "dp":
        if ledger is None:
            raise ValueError("privacy.mode='dp' needs the client's PrivacyLedger")
        from fedlora.client.private_round import dp_train_round

        return RoundOutcome(*dp_train_round(cfg, site, server_round, ledger))
    variant = VARIANTS.get(cfg.adapter.variant)
    factors = variant.factors_for_round(server_round)
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
        rule=step_rule(cfg),
        logit_offsets=label_offsets(cfg, data),
    )
    state = select(adapter_state(bundle.model), factors)
    return RoundOutcome(state=state, result=result, num_examples=len(data))


def label_offsets(cfg: ClientConfig, data: Dataset[Batch]) -> Tensor | None:
    """``train.logit_adjustment`` offsets from this client's labels (or ``None``)."""
    tau = cfg.train.logit_adjustment
    if not tau:
        return None
    n = len(data)  # type: ignore[arg-type]
    labels = torch.stack([data[i]["labels"] for i in range(n)])  # (N,)
    return logit_adjustment(labels, cfg.data.num_classes, tau)


def check_frozen(
    model: torch.nn.Module, received: Mapping[str, Tensor], expected: str
) -> None:
    """Refuse to train if the tensors not sent differ from the server's copy."""
    if not expected:
        return
    state = adapter_state(model)  # type: ignore[arg-type]
    local = fingerprint(state, [k for k in state if k not in received])
    if local != expected:
        raise RuntimeError(
            "The frozen adapter tensors (e.g. FFA-LoRA's A) differ from the "
            f"server's: fingerprint {local[:12]} != {expected[:12]}. Every site must "
            "build the same base model and adapter init (same seed, model, rank)."
        )


def evaluate_round(
    cfg: ClientConfig,
    site: SiteConfig,
    global_state: Mapping[str, Tensor],
    residual: Residual | None = None,
    frozen_fingerprint: str = "",
) -> EvalResult:
    """Evaluate the global adapter (+ FLoRA residual) on this client's data.

    ``frozen_fingerprint``: the server's fingerprint of the tensors it did not
    send (FFA's A, VeRA's projections); this site evaluates with its own.
    """
    cfg = for_site(cfg, site)
    check_rank(cfg, global_state)
    bundle = model_bundle(cfg)
    check_frozen(bundle.model, global_state, frozen_fingerprint)
    set_residual(bundle.model, residual or {})
    load_adapter_state(bundle.model, global_state)
    data = partition_dataset(
        cfg, site.partition_id, site.num_partitions, site.data_path
    )
    result = evaluate(
        bundle.model,
        data,
        collator(cfg),
        task=cfg.data.task,
        batch_size=cfg.train.eval_batch_size,
        device=bundle.device,
    )
    return with_generation(result, bundle.model, data, cfg, bundle.device)


def column_scores_for_site(
    cfg: ClientConfig, site: SiteConfig, budget: int, samples: int = 128
) -> dict[str, tuple[list[int], list[float]]]:
    """SHE-LoRA calibration: the ``budget`` most sensitive columns per matrix.

    Runs the site's model (its own rank) over up to ``samples`` local examples
    and scores every input column by ``sum |A[:, j]| * ||X_j||``. Under
    ``privacy=dp`` no example is read: the scores are ``sum |A[:, j]|`` of the
    adapter the site holds (``fedlora.she.updates.private_sensitivity``), so what
    the site sends is not a function of its data.
    """
    from fedlora.lora.state import matrix_names
    from fedlora.she.updates import input_norms, private_sensitivity, sensitivity
    from fedlora.train import to_device

    cfg = for_site(cfg, site)
    bundle = model_bundle(cfg)
    state = adapter_state(bundle.model)
    if cfg.privacy.mode == "dp":
        return private_sensitivity(state, budget)
    data = partition_dataset(
        cfg, site.partition_id, site.num_partitions, site.data_path
    )
    collate = collator(cfg)
    n, size = min(samples, len(data)), cfg.train.eval_batch_size
    batches = [
        to_device(collate([data[i] for i in range(s, min(n, s + size))]), bundle.device)
        for s in range(0, n, size)
    ]
    norms = input_norms(bundle.model, batches, matrix_names(state))
    return sensitivity(state, norms, budget)


def check_base_model(cfg: ClientConfig, site: SiteConfig, expected: str) -> None:
    """Refuse to train or evaluate on a base model other than the server's."""
    if not expected:
        return
    from fedlora.fingerprint import model_fingerprint

    local = model_fingerprint(model_bundle(for_site(cfg, site)).model)
    if local != expected:
        raise ValueError(
            f"this site's base model (fingerprint {local}) is not the server's "
            f"({expected}): check node-config model-path and the run's model.name / "
            "model.quantization; refusing to train on different weights"
        )
