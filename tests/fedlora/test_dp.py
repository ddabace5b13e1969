"""DP-SGD (Opacus) through LoRA on tiny models, accounting, and LA-LoRA's filter."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from fedlora.config import AdapterConfig, ModelConfig
from fedlora.data.tokenize import Collator
from fedlora.dp import (
    DPSettings,
    DPTrainer,
    PrivacyLedger,
    calibrate_noise,
    check_opacus_compatible,
    lowpass_filter,
    per_sample_loss,
    poisson_batch,
)

TINY = ModelConfig(name="tiny_llama", tiny_hidden_size=64, tiny_layers=2)
LORA = AdapterConfig(rank=4, alpha=8.0)
TASKS = ("classification", "causal_lm")
NUM_LABELS = 3
PAD = 0  # the tiny_llama preset's pad id (MiniLM tokenizer)
B = 4  # expected batch size b in the step tests
Batch = dict[str, Tensor]


def _model(task: str, quantization: str = "none", seed: int = 0) -> nn.Module:
    """Tiny Llama + LoRA (+ trainable head for classification) with B != 0."""
    from fedlora.models import load_base_model, wrap_lora

    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    cfg = replace(TINY, quantization=quantization)
    base = load_base_model(cfg, task=task, num_labels=NUM_LABELS, seed=seed)
    model = wrap_lora(base, cfg, LORA, task=task, seed=seed)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # non-zero B so gradients reach every A
            p.data = torch.randn(p.shape, generator=g) * 0.1
    model.train()
    return model


def _items(task: str, lengths: tuple[int, ...] = (12, 7, 10, 5)) -> list[Batch]:
    """Examples of different lengths (padding) and target-token counts."""
    g = torch.Generator().manual_seed(2)
    items = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1000, 2000, (n,), generator=g)
        if task == "classification":
            labels = torch.tensor(i % NUM_LABELS)
        else:
            labels = ids.clone()
            labels[: 1 + i % 3] = -100  # a prompt of 1-3 tokens
        items.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        )
    return items


def _collate(task: str, items: list[Batch]) -> Batch:
    return Collator(pad_id=PAD, task=task)(items)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _loop_grads(
    model: nn.Module, task: str, items: list[Batch]
) -> list[dict[str, Tensor]]:
    """Reference: each example alone, HF's loss of that example, backward."""
    grads = []
    for item in items:
        model.zero_grad(set_to_none=True)
        model(**_collate(task, [item])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in _trainable(model).items()})
    model.zero_grad(set_to_none=True)
    return grads


def _settings(**overrides: float) -> DPSettings:
    values: dict[str, float | str] = dict(
        noise_multiplier=0.0,
        max_grad_norm=1e9,
        sample_rate=0.25,
        delta=1e-5,
        accountant="rdp",
        expected_batch_size=B,
    )
    return DPSettings(**{**values, **overrides})


def _trainer(model: nn.Module, settings: DPSettings, **kwargs: object) -> DPTrainer:
    ledger = PrivacyLedger(settings.accountant, settings.delta)
    kwargs = {"lr": 1e-2, "weight_decay": 0.0, **kwargs}
    return DPTrainer(model, settings=settings, ledger=ledger, **kwargs)


def _capture(into: dict[str, Tensor]) -> Callable[[str, Tensor], Tensor]:
    """grad_transform that records the privatised gradient and leaves it as is."""

    def transform(name: str, grad: Tensor) -> Tensor:
        into[name] = grad.clone()
        return grad

    return transform


def _mismatches(
    got: dict[str, Tensor], want: dict[str, Tensor], rtol: float, atol: float
) -> list[str]:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    return [
        f"{k}: max abs err {float((got[k] - want[k]).abs().max()):.3g}"
        for k in want
        if not torch.allclose(got[k], want[k], rtol=rtol, atol=atol)
    ]


# --- per-sample gradients and clipping through LoRA on an NF4 base -------------


@pytest.mark.bnb
@pytest.mark.parametrize("task", TASKS)
def test_per_sample_grads_on_nf4_equal_a_loop_over_examples(task: str) -> None:
    """Opacus' grad_sample of every trainable tensor == the gradient of each
    example's own loss computed alone (padding in the batch changes nothing)."""
    from fedlora.dp.compat import grad_sample_module_cls

    model = _model(task, "nf4")
    items = _items(task)
    want = _loop_grads(model, task, items)
    gsm = grad_sample_module_cls()(model, loss_reduction="sum")
    batch = _collate(task, items)
    labels = batch.pop("labels")
    per_sample_loss(gsm(**batch).logits, labels, task=task).sum().backward()
    params = _trainable(model)
    assert len(params) == 2 * 2 * 2 + (task == "classification")  # q,v x A,B (+ head)
    bad = []
    for i in range(len(items)):
        got = {n: p.grad_sample[i] for n, p in params.items()}
        bad += [f"example {i} {m}" for m in _mismatches(got, want[i], 1e-4, 1e-6)]
    gsm.to_standard_module()
    assert not bad, "per-sample gradients differ:\n" + "\n".join(bad)


@pytest.mark.bnb
@pytest.mark.parametrize("task", TASKS)
def test_flat_clipping_over_all_trainable_tensors_jointly(task: str) -> None:
    """sigma=0: the privatised grad is sum_i min(1, C/||g_i||) g_i / b with ||g_i||
    the norm over ALL trainable tensors of example i together."""
    model = _model(task, "nf4")
    items = _items(task)
    per_example = _loop_grads(model, task, items)
    norms = [
        math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        for grads in per_example
    ]
    clip = sorted(norms)[len(norms) // 2]  # some examples clipped, some not
    factors = [min(1.0, clip / n) for n in norms]
    assert min(factors) < 1.0 == max(factors)
    want = {
        k: sum(f * g[k] for f, g in zip(factors, per_example, strict=True)) / B
        for k in per_example[0]
    }
    got: dict[str, Tensor] = {}
    trainer = _trainer(model, _settings(max_grad_norm=clip))
    trainer.step(_collate(task, items), task=task, grad_transform=_capture(got))
    trainer.detach()
    # Opacus divides by ||g_i|| + 1e-6: relative error <= 1e-6 / ||g_i||.
    bad = _mismatches(got, want, 1e-4, 1e-6)
    assert not bad, "clipped sum differs:\n" + "\n".join(bad)


# --- DP(sigma=0, C=inf) equals the non-DP step ---------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_zero_noise_infinite_clip_equals_plain_adamw_on_sum_over_b(task: str) -> None:
    """One DPTrainer step with sigma=0, C=1e9 == one AdamW step on
    per_sample_loss(...).sum() / b (same gradient, same updated parameters)."""
    lr, wd = 1e-2, 0.1
    dp_model, plain = _model(task), _model(task)
    batch = _collate(task, _items(task))
    got: dict[str, Tensor] = {}
    trainer = _trainer(dp_model, _settings(), lr=lr, weight_decay=wd)
    trainer.step(batch, task=task, grad_transform=_capture(got))
    trainer.detach()

    params = _trainable(plain)
    # Which Hugging Face loss is the same objective (the lead's equivalence test):
    plain(**batch).loss.backward()
    hf = {n: p.grad.clone() for n, p in params.items()}
    plain.zero_grad(set_to_none=True)

    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=wd)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = plain(**inputs).logits
    (per_sample_loss(logits, batch["labels"], task=task).sum() / B).backward()
    want = {n: p.grad.clone() for n, p in params.items()}
    opt.step()
    bad = _mismatches(got, want, 1e-4, 1e-7)
    bad += _mismatches(
        {n: p.detach() for n, p in _trainable(dp_model).items()},
        {n: p.detach() for n, p in params.items()},
        1e-5,
        1e-6,
    )
    assert not bad, "DP(0, inf) differs from plain AdamW:\n" + "\n".join(bad)
    # classification: HF's mean CE over B = b examples is sum / b; causal LM: HF's
    # token mean over the batch is not (the examples have different target counts).
    same = not _mismatches(hf, want, 1e-4, 1e-7)
    assert same == (task == "classification")


# --- privacy accounting ----------------------------------------------------------


def _independent_rdp_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Mironov et al. 2019 integer-order RDP of the Poisson-subsampled Gaussian,
    A_a = sum_k C(a,k) (1-q)^(a-k) q^k exp((k^2-k)/(2 sigma^2)), rdp = T log A_a/(a-1),
    converted with Balle et al. 2020 Thm 21 (what opacus 1.6 uses):
    eps = rdp + log((a-1)/a) - (log delta + log a)/(a-1), minimised over a."""
    best = math.inf
    for a in range(2, 257):
        terms = [
            math.lgamma(a + 1)
            - math.lgamma(k + 1)
            - math.lgamma(a - k + 1)
            + k * math.log(q)
            + (a - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma**2)
            for k in range(a + 1)
        ]
        top = max(terms)
        log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        rdp = steps * log_a / (a - 1)
        eps = rdp + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        best = min(best, eps)
    return best


def test_rdp_epsilon_matches_golden_value() -> None:
    """Known Opacus RDP value: sigma=1, q=8/64, 5 steps, delta=1e-5 -> epsilon 3.345."""
    ledger = PrivacyLedger("rdp", 1e-5)
    ledger.step(1.0, 8 / 64, n=5)
    assert ledger.epsilon() == pytest.approx(3.345, abs=5e-4)


# Regimes whose optimal order is >= 12, where Opacus' default orders are the
# integers (below 12 it also tries fractional orders that beat any integer one).
@pytest.mark.parametrize(
    ("sigma", "q", "steps"), [(1.5, 0.01, 1000), (2.0, 0.02, 300), (3.0, 0.05, 100)]
)
def test_rdp_epsilon_matches_independent_computation(
    sigma: float, q: float, steps: int
) -> None:
    ledger = PrivacyLedger("rdp", 1e-5, [(sigma, q, steps)])
    want = _independent_rdp_epsilon(sigma, q, steps, 1e-5)
    assert ledger.epsilon() == pytest.approx(want, rel=0.01)


def test_calibrated_sigma_meets_the_target_within_a_few_percent() -> None:
    q, steps, target = 0.125, 20, 3.0
    sigma = calibrate_noise(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp"
    )
    eps = PrivacyLedger("rdp", 1e-5).epsilon_after(sigma, q, steps)
    assert 0.97 * target <= eps <= target


def test_epsilon_grows_and_survives_a_client_restart(tmp_path: Path) -> None:
    ledger = PrivacyLedger("rdp", 1e-5)
    assert ledger.epsilon() == 0.0 and ledger.steps == 0
    seen = []
    for _ in range(3):
        before = ledger.epsilon_after(1.0, 0.1, 2)
        ledger.step(1.0, 0.1, n=2)
        assert ledger.epsilon() == pytest.approx(before)  # epsilon_after is exact
        seen.append(ledger.epsilon())
    assert seen == sorted(seen) and len(set(seen)) == 3
    assert ledger.epsilon_after(1.0, 0.1, 5) > seen[-1] and ledger.steps == 6

    restored = PrivacyLedger.from_json(ledger.to_json())
    ledger.save(tmp_path / "state" / "ledger.json")
    reloaded = PrivacyLedger.load(tmp_path / "state" / "ledger.json")
    for other in (restored, reloaded):
        assert other.history == ledger.history and other.steps == 6
        assert other.epsilon() == ledger.epsilon()
    reloaded.step(0.8, 0.1)  # a new sigma continues the same history
    assert reloaded.steps == 7 and reloaded.epsilon() > ledger.epsilon()
    assert [p.name for p in (tmp_path / "state").iterdir()] == ["ledger.json"]


def test_prv_ledger_round_trips_and_is_tighter_than_rdp() -> None:
    history = [(1.0, 0.125, 5), (0.8, 0.125, 3)]
    prv = PrivacyLedger("prv", 1e-5, history)
    restored = PrivacyLedger.from_json(prv.to_json())
    assert restored.accountant == "prv" and restored.history == history
    assert restored.epsilon() == prv.epsilon()
    assert 0 < prv.epsilon() < PrivacyLedger("rdp", 1e-5, history).epsilon()


def test_ledger_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="accountant='gdp'"):
        PrivacyLedger("gdp", 1e-5)
    with pytest.raises(ValueError, match="version"):
        PrivacyLedger.from_json('{"accountant": "rdp", "delta": 1e-5, "history": []}')
    noiseless = PrivacyLedger("rdp", 1e-5, [(0.0, 0.1, 1)])
    assert noiseless.epsilon() == math.inf


# --- empty Poisson batches --------------------------------------------------------


def test_poisson_batch_is_seeded_and_may_be_empty() -> None:
    sizes = [
        len(poisson_batch(100, 0.05, torch.Generator().manual_seed(s)))
        for s in range(200)
    ]
    assert sum(sizes) / len(sizes) == pytest.approx(5.0, rel=0.15)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(poisson_batch(100, 0.3, g1), poisson_batch(100, 0.3, g2))
    assert len(poisson_batch(3, 1e-9, torch.Generator().manual_seed(0))) == 0


@pytest.mark.parametrize("task", TASKS)
def test_empty_batch_adds_noise_and_counts_as_a_step(task: str) -> None:
    """No forward (HF raises on 0 examples), yet noise moves the parameters and the
    ledger records the step (skipping it would under-count epsilon)."""
    model = _model(task)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    trainer = _trainer(model, _settings(noise_multiplier=1.0, max_grad_norm=1.0))
    loss = trainer.step(_collate(task, []), task=task)
    trainer.detach()
    assert math.isnan(loss)
    unchanged = [n for n, p in _trainable(model).items() if torch.equal(p, before[n])]
    assert not unchanged, f"no noise reached {unchanged}"
    assert trainer.ledger.steps == 1 and trainer.ledger.epsilon() > 0


# --- alternating factors, lr ratio, hooks lifecycle --------------------------------


def test_alternating_factors_step_only_the_active_one() -> None:
    """Wrap with A and B trainable, then freeze one per step: the frozen factor
    gets no grad, no noise and no weight decay (Opacus noises only trainable
    tensors, and hooks only those trainable at wrap time)."""
    task = "causal_lm"
    model = _model(task)
    trainer = _trainer(
        model, _settings(noise_multiplier=1.0, max_grad_norm=1.0), weight_decay=0.1
    )
    batch = _collate(task, _items(task))
    for active in ("lora_B", "lora_A"):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(active in name)
        seen: dict[str, Tensor] = {}
        trainer.step(batch, task=task, grad_transform=_capture(seen))
        assert seen and all(active in n for n in seen)
        for name, p in model.named_parameters():
            assert torch.equal(p, before[name]) != (active in name), name
    assert trainer.ledger.steps == 2
    trainer.detach()


def test_lr_scale_gives_lora_b_twice_the_step() -> None:
    """AdamW's first step moves each entry by about lr: B by 2 lr, A by lr."""
    task = "causal_lm"
    model = _model(task)
    before = {n: p.detach().clone() for n, p in _trainable(model).items()}
    trainer = _trainer(model, _settings(), lr=1e-3, lr_scale={"lora_B": 2.0})
    trainer.step(_collate(task, _items(task)), task=task)
    trainer.detach()
    for name, p in _trainable(model).items():
        step = float((p.detach() - before[name]).abs().max())
        assert step == pytest.approx(2e-3 if "lora_B" in name else 1e-3, rel=1e-3)
    with pytest.raises(ValueError, match="match no trainable parameter"):
        _trainer(_model(task), _settings(), lr_scale={"lora_X": 2.0})


def test_unfreezing_after_wrap_is_refused() -> None:
    task = "causal_lm"
    model = _model(task)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    trainer = _trainer(model, _settings())
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(True)
    with pytest.raises(ValueError, match="became trainable after DPTrainer"):
        trainer.step(_collate(task, _items(task)), task=task)
    trainer.detach()


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
        for m in model.modules()
    )


def test_detach_leaves_a_plain_model_that_can_be_wrapped_again() -> None:
    task = "causal_lm"
    model = _model(task)
    batch = _collate(task, _items(task))
    hooks = _hook_count(model)
    trainer = _trainer(model, _settings(noise_multiplier=0.5, max_grad_norm=1.0))
    trainer.step(batch, task=task)
    with pytest.raises(RuntimeError, match="call detach"):
        _trainer(model, _settings())
    assert trainer.detach() is model
    assert _hook_count(model) == hooks
    assert not hasattr(model, "autograd_grad_sample_hooks")
    leftovers = [
        n
        for n, p in model.named_parameters()
        if any(
            hasattr(p, a) for a in ("grad_sample", "summed_grad", "_forward_counter")
        )
    ]
    assert not leftovers
    assert not any(hasattr(m, "activations") for m in model.modules())

    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()  # a plain forward/backward works
    grads = [p.grad for p in _trainable(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    model.zero_grad(set_to_none=True)

    again = _trainer(model, _settings(noise_multiplier=0.5, max_grad_norm=1.0))
    assert math.isfinite(again.step(batch, task=task))
    again.detach()
    with pytest.raises(RuntimeError, match="after detach"):
        again.step(batch, task=task)


# --- compatibility check ---------------------------------------------------------


class _Gain(nn.Module):
    """A custom layer with a raw parameter: Opacus has no per-sample rule for it."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def test_check_opacus_compatible_names_unsupported_trainable_modules() -> None:
    model = nn.Sequential(nn.Linear(4, 4), _Gain(), nn.BatchNorm1d(4))
    with pytest.raises(ValueError) as info:
        check_opacus_compatible(model)
    message = str(info.value)
    assert "1 (_Gain)" in message and "2 (BatchNorm1d)" in message
    assert "0 (Linear)" not in message
    model[2].requires_grad_(False)  # frozen modules are never checked
    check_opacus_compatible(model, grad_sample_mode="functorch")
    model[1].requires_grad_(False)
    check_opacus_compatible(model)
    check_opacus_compatible(_model("classification"))
    with pytest.raises(ValueError, match="'hooks', 'functorch'"):
        check_opacus_compatible(model, grad_sample_mode="ghost")


# --- LA-LoRA low-pass filter -------------------------------------------------------


def test_lowpass_filter_equals_hand_computed_convolution() -> None:
    """Kernel [1,4,6,4,1]/16 with symmetric padding [x1, x0 | x ... | x5, x4]:
    [1..6] pads to [2,1,1,2,3,4,5,6,6,5]; e.g. out0 = (2+4+6+8+3)/16 = 23/16."""
    rows = torch.tensor([[1.0, 2, 3, 4, 5, 6], [16.0, 0, 0, 0, 0, 0]])  # (r=2, d=6)
    want = torch.tensor([[23.0, 33, 48, 64, 79, 89], [160.0, 80, 16, 0, 0, 0]]) / 16
    # row 2: [0,16 | 16,0,0,0,0,0 | 0,0] -> out0 = (4*16 + 6*16)/16 = 10, ...
    assert torch.allclose(lowpass_filter(rows, "lora_A"), want)
    assert torch.allclose(lowpass_filter(rows.t(), "lora_B"), want.t())


def test_lowpass_filter_keeps_constants_and_never_mixes_the_rank_axis() -> None:
    g = torch.Generator().manual_seed(0)
    levels = torch.randn(3, 1, generator=g)
    a = levels.expand(3, 7).clone()  # each row constant, rows differ: (r, d_in)
    assert torch.allclose(lowpass_filter(a, "lora_A"), a)
    assert torch.allclose(lowpass_filter(a.t(), "lora_B"), a.t())
    assert torch.allclose(lowpass_filter(a[:, :1], "lora_A"), a[:, :1])  # d = 1

    x = torch.randn(3, 7, generator=g)
    original = x.clone()
    out_a, out_b = lowpass_filter(x, "lora_A"), lowpass_filter(x.t(), "lora_B")
    assert torch.equal(x, original)  # pure
    bumped = x.clone()
    bumped[1] += 5.0  # change one rank row of A / one rank column of B
    new_a, new_b = (
        lowpass_filter(bumped, "lora_A"),
        lowpass_filter(bumped.t(), "lora_B"),
    )
    assert torch.equal(new_a[[0, 2]], out_a[[0, 2]])
    assert torch.equal(new_b[:, [0, 2]], out_b[:, [0, 2]])
    assert not torch.equal(new_a[1], out_a[1])
    with pytest.raises(ValueError, match="lora_A"):
        lowpass_filter(x, "head")
