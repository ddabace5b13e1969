"""DP randomness: the OS-CSPRNG source is the right Gaussian and is what runs.

References: the standard normal distribution (moments and a Kolmogorov-Smirnov
test), the privatised gradient of a step whose clipped signal is ~0 (pure noise
of std ``sigma C / b``), and a count of ``os.urandom`` calls on the production
path ``train_round`` with ``privacy.secure_rng`` on and off.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from tiny_configs import tiny_values

import fedlora.dp.randomness as randomness
from fedlora.cache import model_bundle
from fedlora.client.round import train_round
from fedlora.client.site import SiteConfig
from fedlora.config.flat import build_config
from fedlora.data.tokenize import Collator
from fedlora.dp import DPSettings, DPTrainer, PrivacyLedger, poisson_batch
from fedlora.dp.randomness import SecureRandom, TorchRandom
from fedlora.lora.state import adapter_state
from strategies.config import ExperimentConfig


def test_secure_normal_is_a_gaussian_of_the_asked_std() -> None:
    std = 2.5
    x = SecureRandom().normal(torch.Size([400, 500]), std).flatten().numpy()
    assert x.shape == (200_000,)
    se = std / math.sqrt(x.size)
    assert abs(x.mean()) < 5 * se
    assert abs(x.std() / std - 1) < 0.01
    assert stats.kstest(x / std, "norm").pvalue > 1e-4


def test_secure_uniforms_are_in_the_unit_interval_and_fresh() -> None:
    rng = SecureRandom()
    u = rng.uniform(100_000).numpy()
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.size)
    assert not torch.equal(rng.uniform(64), rng.uniform(64))
    kept = poisson_batch(10_000, 0.1, rng)
    assert abs(len(kept) - 1000) < 5 * math.sqrt(10_000 * 0.1 * 0.9)


def test_torch_source_is_reproducible_only_with_an_explicit_seed() -> None:
    a, b = TorchRandom(7), TorchRandom(7)
    assert torch.equal(a.normal(torch.Size([5]), 1.0), b.normal(torch.Size([5]), 1.0))
    assert TorchRandom().seed != TorchRandom().seed  # 63 fresh OS bits each time


def _noise_only_grads(rng: SecureRandom | None) -> torch.Tensor:
    """Privatised gradient of one step whose clipped signal is negligible."""
    from fedlora.config import AdapterConfig, ModelConfig
    from fedlora.models import load_base_model, wrap_lora

    torch.manual_seed(0)  # the same torch state for every call
    cfg = ModelConfig(name="tiny_llama", tiny_hidden_size=64, tiny_layers=2)
    base = load_base_model(cfg, task="classification", num_labels=3, seed=0)
    model = wrap_lora(
        base, cfg, AdapterConfig(rank=4, alpha=8.0), task="classification", seed=0
    )
    sigma, clip, b = 3.0, 1e-6, 4
    settings = DPSettings(
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=0.25,
        delta=1e-5,
        accountant="rdp",
        expected_batch_size=b,
    )
    trainer = DPTrainer(
        model,
        settings=settings,
        ledger=PrivacyLedger("rdp", 1e-5),
        lr=0.0,
        weight_decay=0.0,
        rng=rng,
    )
    seen: list[torch.Tensor] = []

    def capture(name: str, grad: torch.Tensor) -> torch.Tensor:
        seen.append(grad.flatten().clone())
        return grad

    ids = torch.arange(1000, 1008).reshape(2, 4)
    batch = Collator(pad_id=0, task="classification")(
        [
            {
                "input_ids": row,
                "attention_mask": torch.ones(4, dtype=torch.long),
                "labels": torch.tensor(i),
            }
            for i, row in enumerate(ids)
        ]
    )
    trainer.step(batch, task="classification", grad_transform=capture)
    trainer.detach()
    return torch.cat(seen) * b / (sigma * clip)  # standard normal if only noise


def test_secure_noise_has_std_sigma_c_over_b_and_ignores_torch_seed() -> None:
    first = _noise_only_grads(SecureRandom())
    second = _noise_only_grads(SecureRandom())
    n = first.numel()
    assert n > 2000
    # 5 standard errors: the std of n normals has SE 1/sqrt(2n), the mean 1/sqrt(n)
    assert abs(float(first.std()) - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(first.mean())) < 5 / math.sqrt(n)
    assert not torch.allclose(first, second)  # same torch seed, different noise
    default = _noise_only_grads(None)  # torch's generator, fresh OS seed
    assert abs(float(default.std()) - 1) < 5 / math.sqrt(2 * n)


BASE = {
    **tiny_values("classification"),
    "data.num_examples": 200,
    "federation.clients": 2,
    "federation.rounds": 2,
    "federation.local_steps": 2,
    "train.batch_size": 8,
    "privacy.mode": "dp",
    "privacy.epsilon": 3.0,
}


@pytest.mark.parametrize("secure", [True, False])
def test_train_round_draws_from_the_os_csprng_only_when_asked(
    secure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = build_config(ExperimentConfig, {**BASE, "privacy.secure_rng": secure})
    calls: list[int] = []
    real = randomness.os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(randomness.os, "urandom", counting)
    start = adapter_state(model_bundle(cfg).model)
    ledger = PrivacyLedger("rdp", 1e-5)
    out = train_round(cfg, SiteConfig(0, 2), 1, start, ledger=ledger)
    assert ledger.steps == 2 and out.state
    if secure:
        # sampling (8 bytes per record) and noise (64 bytes per parameter) per step
        assert len(calls) >= 2 * (1 + 8) and sum(calls) > 64 * 2 * 1000
    else:
        assert calls == []
