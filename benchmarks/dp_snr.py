"""Signal-to-noise of one DP-SGD step, per adapter variant, before running a study.

For a DP setting (any run-config overrides), and for each variant, this reports:

- ``sigma``, ``q``, ``b``: what a client calibrates
  (``fedlora.client.private_round.dp_settings`` on site 0's partition, for the
  whole planned run);
- ``d``: the number of parameters noised in one step (both factors and the head
  for ``lora``; B and the head for ``ffa``; the one active factor and the head for
  ``la_lora`` and ``rolora``, whose round 1 / first step trains B);
- ``noise_norm = sigma C sqrt(d) / b``: the norm of the noise in the privatised
  gradient (data-independent);
- ``signal_norm``: the norm of ``sum_i clip(g_i) / b`` on one Poisson batch of
  site 0 at the initial adapter, measured with sigma = 0 (a non-private
  measurement for planning only; it is never sent anywhere) and
  ``ratio = noise_norm / signal_norm``. A ratio well above 1 means a step is mostly
  noise; the average over T steps shrinks the noise by about sqrt(T) only.

Commands (repository root; one core)::

    PYTHONPATH=. python -m benchmarks.dp_snr                               # defaults
    PYTHONPATH=. python -m benchmarks.dp_snr train.batch_size=256 \\
        model.num_layers=2 data.num_classes=2 data.num_examples=24000 \\
        federation.clients=2 federation.rounds=5 federation.local_steps=8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from datetime import datetime
from typing import Any

import torch

from benchmarks.output import write_result

VARIANT_NAMES = ("lora", "ffa", "la_lora", "rolora")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def measure(overrides: dict[str, Any], variant: str) -> dict[str, Any]:
    """SNR of the first DP step of site 0 for ``variant`` (see module docstring)."""
    from fedlora.cache import collator, model_bundle, partition_dataset, set_trainable
    from fedlora.client.private_round import dp_settings
    from fedlora.config.flat import build_config
    from fedlora.dp import DPTrainer, PrivacyLedger, poisson_batch
    from fedlora.dp.randomness import TorchRandom
    from fedlora.lora.state import adapter_state, load_adapter_state
    from fedlora.lora.variants import VARIANTS
    from fedlora.train import activate_factors, step_rule
    from strategies.config import ExperimentConfig

    values = {"privacy.mode": "dp", "privacy.epsilon": 1.0, **overrides}
    cfg = build_config(ExperimentConfig, {**values, "adapter.variant": variant})
    bundle = model_bundle(cfg)
    model = bundle.model
    load_adapter_state(model, adapter_state(model))
    data = partition_dataset(cfg, 0, cfg.federation.clients)
    settings = dp_settings(cfg, len(data))
    factors = VARIANTS.get(variant).factors_for_round(1)
    set_trainable(model, factors, train_head=cfg.adapter.train_head)
    rule = step_rule(cfg)
    quiet = dataclasses.replace(settings, noise_multiplier=0.0)
    trainer = DPTrainer(
        model,
        settings=quiet,
        ledger=PrivacyLedger(settings.accountant, settings.delta),
        lr=0.0,
        weight_decay=0.0,
        rng=TorchRandom(0),
    )
    if rule.factors_for_step is not None:
        activate_factors(model, trainer.param_names, rule.factors_for_step(1))
    grads: list[torch.Tensor] = []

    def capture(name: str, grad: torch.Tensor) -> torch.Tensor:
        grads.append(grad.detach().flatten())
        return grad

    idx = poisson_batch(len(data), settings.sample_rate, TorchRandom(1))
    batch = collator(cfg)([data[int(i)] for i in idx])
    trainer.step(batch, task=cfg.data.task, grad_transform=capture)
    trainer.detach()
    signal = float(torch.cat(grads).norm())
    d = sum(g.numel() for g in grads)
    b = settings.expected_batch_size
    noise = settings.noise_multiplier * settings.max_grad_norm * math.sqrt(d) / b
    return {
        "variant": variant,
        "sigma": round(settings.noise_multiplier, 4),
        "q": round(settings.sample_rate, 5),
        "b": b,
        "local_examples": len(data),
        "d": d,
        "noise_norm": round(noise, 4),
        "signal_norm": round(signal, 4),
        "ratio": round(noise / signal, 2) if signal > 0 else None,
    }


def main(argv: list[str] | None = None) -> None:
    """Print (and save) the SNR of every variant under the given overrides."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="run-config key=value pairs")
    parser.add_argument("--variants", nargs="*", default=list(VARIANT_NAMES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    overrides = dict(kv.split("=", 1) for kv in args.overrides)
    parsed = {k: _value(v) for k, v in overrides.items()}
    rows = [measure(parsed, v) for v in args.variants]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    write_result("dp_snr", stamp, {"overrides": parsed, "variants": rows}, None)


if __name__ == "__main__":
    main(sys.argv[1:])
