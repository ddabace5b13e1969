"""A client's DP-SGD round (``privacy=dp``): calibration, budget check, training.

Sample-level (epsilon, delta)-DP per client: every local step is a Poisson batch at
rate ``q = train.batch_size / N_i`` with flat per-sample clipping over the tensors
trained in that step and Gaussian noise (``fedlora.dp.DPTrainer``). The ledger
(accountant history) is the client's and spans every round it takes part in; the
ClientApp stores it in Flower's ``context.state`` and in a state file, so a
restarted client continues from what it already spent.

Randomness: with ``sigma > 0`` the Poisson sampling and the noise never come from
the run's public seed (a server that could replay the noise could subtract it):
by default from torch's Mersenne Twister seeded with 63 bits from ``secrets`` each
round (not cryptographically secure), with ``privacy.secure_rng`` from the OS
CSPRNG (``fedlora.dp.randomness``). With ``sigma = 0`` (no privacy claimed) they
are seeded from the run seed, so such runs are reproducible.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import ConfigRecord, Context
from torch import Tensor, nn

from fedlora.cache import collator, model_bundle, partition_dataset, set_trainable
from fedlora.client.site import SiteConfig
from fedlora.config import ClientConfig
from fedlora.dp import (
    DPSettings,
    DPTrainer,
    PrivacyLedger,
    calibrate_noise,
    poisson_batch,
)
from fedlora.dp.randomness import DPRandom, TorchRandom, dp_random
from fedlora.lora.state import adapter_state, select
from fedlora.lora.variants import VARIANTS
from fedlora.protocol import PrivacyReport
from fedlora.train import (
    TrainResult,
    activate_factors,
    derive_seed,
    lr_factor,
    lr_ratio,
    step_rule,
    to_device,
)


def planned_steps(cfg: ClientConfig) -> int:
    """Local steps a client is expected to take over the run (for calibration)."""
    fed = cfg.federation
    rounds = max(1, round(fed.rounds * fed.fraction_train))
    return rounds * fed.local_steps


@lru_cache(maxsize=16)
def dp_settings(cfg: ClientConfig, num_examples: int) -> DPSettings:
    """sigma, C, q and b for a client with ``num_examples`` local examples.

    sigma is the explicit ``privacy.noise_multiplier`` or calibrated once so the
    whole planned run meets ``privacy.epsilon``.
    """
    p = cfg.privacy
    batch = min(cfg.train.batch_size, num_examples)
    q = batch / num_examples
    if p.noise_multiplier >= 0:
        sigma = p.noise_multiplier
    else:
        sigma = calibrate_noise(
            target_epsilon=p.epsilon,
            delta=p.delta,
            sample_rate=q,
            steps=planned_steps(cfg),
            accountant=p.accountant,
        )
    return DPSettings(
        noise_multiplier=sigma,
        max_grad_norm=p.max_grad_norm,
        sample_rate=q,
        delta=p.delta,
        accountant=p.accountant,
        expected_batch_size=batch,
    )


def new_ledger(cfg: ClientConfig) -> PrivacyLedger:
    """Return an empty ledger with the run's accountant and delta."""
    return PrivacyLedger(cfg.privacy.accountant, cfg.privacy.delta)


def ledger_path(cfg: ClientConfig, site: SiteConfig, output_dir: str) -> Path:
    """Where this site keeps its ledger across restarts.

    node-config ``state-dir`` > ``privacy.state_dir`` > ``<output_dir>/client-state``;
    in simulation each partition (virtual site) gets its own file.
    """
    root = (
        site.state_dir
        or cfg.privacy.state_dir
        or str(Path(output_dir or ".") / "client-state")
    )
    return Path(root).expanduser() / f"partition-{site.partition_id}" / "dp-ledger.json"


def load_ledger(
    cfg: ClientConfig, path: Path, fallback_json: str = ""
) -> PrivacyLedger:
    """Return the ledger with the most steps: state file or ``fallback_json``.

    The file survives a restarted client process; ``fallback_json`` is the copy in
    Flower's ``context.state`` (survives between rounds of a running SuperNode).
    """
    candidates = [new_ledger(cfg)]
    if path.is_file():
        candidates.append(PrivacyLedger.load(path))
    if fallback_json:
        candidates.append(PrivacyLedger.from_json(fallback_json))
    for ledger in candidates:
        if (ledger.accountant, ledger.delta) != (
            cfg.privacy.accountant,
            cfg.privacy.delta,
        ):
            raise ValueError(
                f"Stored DP ledger ({ledger.accountant}, delta={ledger.delta}) does "
                f"not match privacy.accountant={cfg.privacy.accountant!r}, "
                f"privacy.delta={cfg.privacy.delta}; use a new privacy.state_dir"
            )
    return max(candidates, key=lambda ledger: ledger.steps)


# context.state key of the DP ledger (accountant history) of this node.
LEDGER_RECORD = "fedlora-dp"


def open_ledger(
    cfg: ClientConfig, site: SiteConfig, context: Context
) -> PrivacyLedger | None:
    """Load the client's ledger before a train round; None unless ``privacy=dp``.

    Read from the state file (survives a restarted client process) and from
    Flower's ``context.state`` (survives between rounds of a running SuperNode),
    whichever has taken more steps.
    """
    if cfg.privacy.mode != "dp":
        return None
    path = ledger_path(cfg, site, str(context.run_config.get("output_dir", "")))
    stored = context.state.config_records.get(LEDGER_RECORD)
    return load_ledger(cfg, path, str(stored["ledger"]) if stored else "")


def keep_ledger(
    ledger: PrivacyLedger | None, cfg: ClientConfig, site: SiteConfig, context: Context
) -> None:
    """Store the ledger after a train round, in the state file and the context."""
    if ledger is None:
        return
    ledger.save(ledger_path(cfg, site, str(context.run_config.get("output_dir", ""))))
    context.state[LEDGER_RECORD] = ConfigRecord({"ledger": ledger.to_json()})


def report(
    ledger: PrivacyLedger, settings: DPSettings, exhausted: bool
) -> PrivacyReport:
    """Snapshot of the ledger for the reply metrics and summary.json."""
    return PrivacyReport(
        epsilon=ledger.epsilon() if ledger.steps else 0.0,
        noise_multiplier=settings.noise_multiplier,
        sample_rate=settings.sample_rate,
        steps=ledger.steps,
        delta=settings.delta,
        accountant=settings.accountant,
        exhausted=exhausted,
    )


def _lr_scale(model: nn.Module, cfg: ClientConfig) -> dict[str, float]:
    """Learning-rate factors of the trainable tensors whose factor is not 1.

    Keyed by full parameter name, with the non-private optimiser's rule
    (:func:`fedlora.train.lr_ratio`: B or VeRA's ``lambda_b`` at ``lr_ratio_b``,
    the head at ``lr_ratio_head``).
    """
    ratios = {
        name: lr_ratio(name, cfg.adapter.lr_ratio_b, cfg.adapter.lr_ratio_head)
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    return {name: r for name, r in ratios.items() if r != 1.0}


def _random(cfg: ClientConfig, sigma: float, *parts: int | str) -> DPRandom:
    """Return the round's source of ``parts`` (noise or sampling).

    sigma = 0 claims no privacy and is reproducible from the run seed; otherwise
    the OS CSPRNG (``privacy.secure_rng``) or torch's MT seeded with 63 OS bits.
    """
    if sigma == 0:
        return TorchRandom(derive_seed(cfg.seed, *parts))
    return dp_random(secure=cfg.privacy.secure_rng)


def dp_train_round(
    cfg: ClientConfig,
    site: SiteConfig,
    server_round: int,
    ledger: PrivacyLedger,
) -> tuple[dict[str, Tensor], TrainResult, int, PrivacyReport]:
    """One DP-SGD round; ``ledger`` is updated in place.

    ``train_round`` has already loaded the global adapter into the cached model
    and checked the frozen tensors' fingerprint.

    Returns the trained tensors (empty when the budget is spent), the training
    result, the local dataset size and the privacy report.
    """
    import time

    bundle = model_bundle(cfg)
    model = bundle.model
    data = partition_dataset(
        cfg, site.partition_id, site.num_partitions, site.data_path
    )
    n = len(data)
    settings = dp_settings(cfg, n)
    steps = cfg.federation.local_steps
    target = cfg.privacy.epsilon
    if (
        target > 0
        and ledger.epsilon_after(settings.noise_multiplier, settings.sample_rate, steps)
        > target + 1e-9
    ):
        empty = TrainResult(loss=float("nan"), steps=0, examples=0, seconds=0.0)
        return {}, empty, n, report(ledger, settings, exhausted=True)
    variant = VARIANTS.get(cfg.adapter.variant)
    factors = variant.factors_for_round(server_round)
    # Opacus hooks only modules trainable at wrap time (a factor unfrozen later
    # gets no per-sample grads): wrap with every factor of the round trainable,
    # then toggle per step.
    set_trainable(model, factors, train_head=cfg.adapter.train_head)
    rule = step_rule(cfg)
    trainer = DPTrainer(
        model,
        settings=settings,
        ledger=ledger,
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        lr_scale=_lr_scale(model, cfg),
        rng=_random(
            cfg, settings.noise_multiplier, server_round, site.partition_id, "noise"
        ),
    )
    sampler = _random(
        cfg, settings.noise_multiplier, server_round, site.partition_id, "poisson"
    )
    collate = collator(cfg)
    losses, examples, start = [], 0, time.perf_counter()
    try:
        for k in range(steps):
            global_step = (server_round - 1) * steps + k
            if rule.factors_for_step is not None:
                activate_factors(
                    model, trainer.param_names, rule.factors_for_step(k + 1)
                )
            trainer.set_lr(
                cfg.train.lr
                * lr_factor(global_step, cfg.federation.rounds * steps, cfg.train)
            )
            idx = poisson_batch(n, settings.sample_rate, sampler)
            batch = to_device(collate([data[int(i)] for i in idx]), bundle.device)
            losses.append(
                trainer.step(
                    batch, task=cfg.data.task, grad_transform=rule.grad_transform
                )
            )
            examples += len(idx)
    finally:
        trainer.detach()
        set_trainable(model, factors, train_head=cfg.adapter.train_head)
    finite = [x for x in losses if x == x]
    result = TrainResult(
        loss=sum(finite) / len(finite) if finite else float("nan"),
        steps=steps,
        examples=examples,
        seconds=time.perf_counter() - start,
    )
    state = select(adapter_state(model), factors)
    return state, result, n, report(ledger, settings, exhausted=False)
