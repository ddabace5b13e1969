"""``train.logit_adjustment``: the logit-adjusted loss with a client's label prior."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_config, tiny_values

from fedlora.cache import collator, model_bundle, partition_dataset
from fedlora.client.round import label_offsets, train_round
from fedlora.client.site import SiteConfig
from fedlora.config.flat import ConfigError, build_config
from fedlora.lora.state import adapter_state, load_adapter_state
from fedlora.train import batch_loss, logit_adjustment
from strategies.config import ExperimentConfig


def test_offsets_are_tau_log_of_the_smoothed_prior() -> None:
    labels = torch.tensor([0, 0, 0, 2, 0, 2])  # class 1 never seen
    got = logit_adjustment(labels, 3, tau=0.5)
    # (n_c + 1) / (N + C) by hand: (5, 1, 3) / 9
    want = [0.5 * math.log(c / 9) for c in (5, 1, 3)]
    assert got.dtype == torch.float32 and got.shape == (3,)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="beyond num_classes=2"):
        logit_adjustment(torch.tensor([0, 2]), 2, tau=1.0)


def skewed_file(tmp_path: Path, share_of_zero: float, n: int = 160) -> Path:
    """A TSV of ``n`` rows whose label is 0 for the first ``share_of_zero`` of them.

    The text says nothing about the label, so the only thing to learn is the prior.
    """
    path = tmp_path / "skewed.tsv"
    lines = ["text\tlabel"]
    for i in range(n):
        label = 0 if i < share_of_zero * n else 1
        lines.append(f"review {i} mentions thing {i % 7}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def skewed_config(path: Path, tau: float) -> ExperimentConfig:
    values = tiny_values(
        "classification",
        {
            "data.source": "local",
            "data.path": str(path),
            "data.num_classes": 2,
            "federation.clients": 1,
            "federation.min_clients": 1,
            "federation.local_steps": 10,
            "train.batch_size": 32,
            "adapter.lr_ratio_head": 3.0,  # the SST-2 recipe (README)
            "train.logit_adjustment": tau,
        },
    )
    return build_config(ExperimentConfig, values)


def test_the_round_uses_the_prior_of_the_clients_own_labels(tmp_path: Path) -> None:
    cfg = skewed_config(skewed_file(tmp_path, 0.75), tau=1.0)
    data = partition_dataset(cfg, 0, 1, "")
    n = len(data)
    zeros = sum(int(data[i]["labels"]) == 0 for i in range(n))
    offsets = label_offsets(cfg, data)
    assert offsets is not None
    want = [math.log((zeros + 1) / (n + 2)), math.log((n - zeros + 1) / (n + 2))]
    assert offsets.tolist() == pytest.approx(want, rel=1e-6)
    off = skewed_config(skewed_file(tmp_path, 0.75), tau=0.0)
    assert label_offsets(off, data) is None


def test_the_training_loss_is_cross_entropy_of_the_shifted_logits() -> None:
    cfg = tiny_config("classification", {"data.num_examples": 256})
    bundle = model_bundle(cfg)
    data = partition_dataset(cfg, 0, cfg.federation.clients, "")
    batch = collator(cfg)([data[i] for i in range(8)])
    offsets = torch.tensor([0.7, -1.3, 0.0, 2.0])[: cfg.data.num_classes]
    bundle.model.eval()  # no dropout: the two forward passes must agree
    with torch.no_grad():
        logits = bundle.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.double()
        shifted = logits + offsets.double()
        want = -(shifted.log_softmax(-1)[torch.arange(8), batch["labels"]]).mean()
        got = batch_loss(bundle.model, batch, offsets)
        plain = batch_loss(bundle.model, batch, None)
        zero = batch_loss(bundle.model, batch, torch.zeros_like(offsets))
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert float(zero) == pytest.approx(float(plain), rel=1e-5)


def mean_margin(cfg: ExperimentConfig, state: dict[str, torch.Tensor]) -> float:
    """Mean logit of class 0 minus class 1 over the client's examples."""
    bundle = model_bundle(cfg)
    load_adapter_state(bundle.model, state)
    data = partition_dataset(cfg, 0, 1, "")
    batch = collator(cfg)([data[i] for i in range(len(data))])
    bundle.model.eval()
    with torch.no_grad():
        logits = bundle.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    return float((logits[:, 0] - logits[:, 1]).mean())


def test_a_skewed_client_pushes_its_prior_into_the_model_only_without_it(
    tmp_path: Path,
) -> None:
    """A 95 % class-0 client with uninformative text: plain training learns "say 0"
    (the optimum margin is log 19 = 2.9); the adjusted loss is already at its
    optimum with a zero margin, so the model barely moves."""
    path = skewed_file(tmp_path, 0.95)
    plain_cfg, adjusted_cfg = skewed_config(path, 0.0), skewed_config(path, 1.0)
    initial = adapter_state(model_bundle(plain_cfg).model)
    before = mean_margin(plain_cfg, initial)
    plain = train_round(plain_cfg, SiteConfig(0, 1), 1, initial).state
    adjusted = train_round(adjusted_cfg, SiteConfig(0, 1), 1, initial).state
    drift_plain = mean_margin(plain_cfg, plain) - before
    drift_adjusted = mean_margin(adjusted_cfg, adjusted) - before
    assert drift_plain > 1.5  # plain training learns the local majority
    assert abs(drift_adjusted) < 0.25 * drift_plain


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"privacy.mode": "dp"}, "privacy.mode='dp'"),
        (
            {"data.source": "synthetic_instruct", "data.task": "causal_lm"},
            "data.task='causal_lm'",
        ),
        ({"train.logit_adjustment": -1.0}, "train.logit_adjustment"),
    ],
)
def test_refused_combinations_name_what_is_wrong(
    override: dict[str, object], named: str
) -> None:
    values = tiny_values("classification", {"train.logit_adjustment": 1.0, **override})
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        build_config(ExperimentConfig, values)
