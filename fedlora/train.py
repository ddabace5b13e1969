"""Local training (K optimizer steps) and evaluation of a PEFT model.

Plain torch loops, so DP-SGD (Opacus) can later wrap the same optimizer and data path.
The data order of a client in a round is drawn from ``(seed, round, client)``: a
client selected again in a later round must not replay the same first batches.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from fedlora.config import ClientConfig, TrainConfig
from fedlora.lm_loss import lm_loss, lm_loss_sum
from fedlora.lora.state import factor_of, is_magnitude, is_vector
from fedlora.lora.variants import VARIANTS

Batch = dict[str, Tensor]
Collate = Callable[[list[Batch]], Batch]


class TrainResult(NamedTuple):
    """Outcome of one client's local round."""

    loss: float  # mean training loss over the optimizer steps
    steps: int  # optimizer steps taken
    examples: int  # examples processed (with repetition)
    seconds: float  # wall time of the loop


class EvalResult(NamedTuple):
    """Loss and task metric of a model on a dataset."""

    loss: float  # mean per example (classification) or per token (causal LM)
    accuracy: float | None  # classification only
    perplexity: float | None  # causal LM only: exp(loss)
    num_examples: int
    exact_match: float | None = None  # causal LM with train.eval_generate > 0
    rouge_l: float | None = None  # likewise (ROUGE-L F-measure)


def derive_seed(*parts: int | str) -> int:
    """Stable 63-bit seed from parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def batch_indices(
    n: int, batch_size: int, num_batches: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Successive batches drawn without replacement from repeated permutations.

    Yields ``num_batches`` index tensors of shape ``(min(batch_size, n),)``.
    """
    size = min(batch_size, n)
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(num_batches):
        if pos + size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + size]
        pos += size


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at 0-based global ``step`` of ``total_steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.scheduler == "linear":
        return 1.0 - progress
    if cfg.scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of ``batch`` to ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


class StepRule(NamedTuple):
    """Per-step behaviour of a local update rule (defaults: plain LoRA).

    ``factors_for_step`` maps the 1-based local step of the round to the LoRA
    factors updated in it (alternating schemes: every round starts the same way,
    whatever the number of local steps); ``grad_transform(name, grad)``
    post-processes each gradient before the update (LA-LoRA's low-pass filter);
    ``lr_ratio_b`` and ``lr_ratio_head`` scale the learning rates of B and of the
    task head relative to A.
    """

    factors_for_step: Callable[[int], frozenset[str]] | None = None
    grad_transform: Callable[[str, Tensor], Tensor] | None = None
    lr_ratio_b: float = 1.0
    lr_ratio_head: float = 1.0


def step_rule(cfg: ClientConfig) -> StepRule:
    """Per-step alternation, gradient filter and B/A learning-rate ratio."""
    variant = VARIANTS.get(cfg.adapter.variant)
    transform = None
    if variant.lowpass and cfg.adapter.lowpass:
        from fedlora.dp import lowpass_filter

        def transform(name: str, grad: Tensor) -> Tensor:
            factor = factor_of(name)
            if factor is None or is_vector(name):  # the filter is for matrices
                return grad
            filtered: Tensor = lowpass_filter(grad, factor)
            return filtered

    return StepRule(
        variant.factors_for_step,
        transform,
        cfg.adapter.lr_ratio_b,
        cfg.adapter.lr_ratio_head,
    )


def logit_adjustment(labels: Tensor, num_classes: int, tau: float) -> Tensor:
    """Additive logit offsets ``tau * log(prior)`` of a client's label prior.

    ``labels``: ``(N,)`` class ids of the client's training examples. Returns
    ``(num_classes,)``. The prior is Laplace-smoothed (``(n_c + 1) / (N + C)``),
    so a class the client never saw gets a finite, strongly negative offset.

    Training on ``logits + offsets`` (the logit-adjusted loss of Menon et al.,
    2021) leaves the model to explain the label given the input without encoding
    this client's label frequencies; under label skew that is what keeps FedAvg
    from averaging clients that each learnt "predict my majority class".
    """
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(
            f"labels reach class {counts.numel() - 1}, beyond num_classes={num_classes}"
        )
    prior = (counts.double() + 1.0) / (counts.sum().double() + num_classes)
    return (tau * prior.log()).float()


def lr_ratio(name: str, lr_ratio_b: float, lr_ratio_head: float) -> float:
    """Learning-rate factor of the adapter tensor ``name`` (see trainable_groups)."""
    factor = "lora_A" if is_magnitude(name) else factor_of(name)
    return {"lora_B": lr_ratio_b, "lora_A": 1.0}.get(factor or "", lr_ratio_head)


def trainable_groups(
    model: nn.Module,
    cfg: TrainConfig,
    lr_ratio_b: float,
    lr_ratio_head: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW parameter groups of the currently trainable parameters.

    B and VeRA's ``lambda_b`` get ``lr_ratio_b`` times ``cfg.lr`` (LoRA+), every
    non-LoRA tensor (the task head) ``lr_ratio_head`` times, A, VeRA's
    ``lambda_d`` and DoRA's magnitude ``cfg.lr``.

    Each group carries ``names`` and ``base_lr`` (the schedule multiplies it).
    """
    groups: dict[float, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr = cfg.lr * lr_ratio(name, lr_ratio_b, lr_ratio_head)
        group = groups.setdefault(lr, {"params": [], "names": [], "base_lr": lr})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise RuntimeError("No trainable parameters: nothing to train")
    return list(groups.values())


def activate_factors(
    model: nn.Module, names: Sequence[str], active: frozenset[str]
) -> None:
    """Enable grads only on the LoRA factors in ``active`` (others keep theirs)."""
    params = dict(model.named_parameters())
    for name in names:
        factor = factor_of(name)
        if factor is not None:
            params[name].requires_grad_(factor in active)


def train_local(
    model: nn.Module,
    dataset: Dataset[Batch],
    collate: Collate,
    *,
    cfg: TrainConfig,
    steps: int,
    start_step: int,
    total_steps: int,
    generator: torch.Generator,
    device: torch.device,
    rule: StepRule = StepRule(),  # noqa: B008 - immutable NamedTuple
    logit_offsets: Tensor | None = None,
) -> TrainResult:
    """Run ``steps`` AdamW steps on the currently trainable parameters.

    Parameters
    ----------
    start_step, total_steps : int
        Global step index of the first step (0-based) and length of the whole run
        (the LR schedule and alternating rules span all rounds).
    generator : torch.Generator
        Source of the data order (seed it from seed, round and client).
    rule : StepRule
        Alternation, gradient post-processing and the B/A learning-rate ratio.
    logit_offsets : Tensor | None
        Classification only: ``(C,)`` added to the logits inside the training loss
        (see :func:`logit_adjustment`); ``None`` trains on the model's own loss.
    """
    offsets = None if logit_offsets is None else logit_offsets.to(device)
    groups = trainable_groups(model, cfg, rule.lr_ratio_b, rule.lr_ratio_head)
    names = [n for g in groups for n in g["names"]]
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(
        [{"params": g["params"], "lr": g["base_lr"]} for g in groups],
        weight_decay=cfg.weight_decay,
    )
    n = len(dataset)  # type: ignore[arg-type]
    batches = batch_indices(n, cfg.batch_size, steps * cfg.grad_accum, generator)
    model.train()
    losses: list[float] = []
    examples = 0
    start = time.perf_counter()
    for k in range(steps):
        if rule.factors_for_step is not None:
            activate_factors(model, names, rule.factors_for_step(k + 1))
        for group, spec in zip(optimizer.param_groups, groups, strict=True):
            group["lr"] = spec["base_lr"] * lr_factor(start_step + k, total_steps, cfg)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            idx = next(batches)
            batch = to_device(collate([dataset[int(i)] for i in idx]), device)
            loss = batch_loss(model, batch, offsets) / cfg.grad_accum
            loss.backward()  # type: ignore[no-untyped-call]  # torch stub
            step_loss += float(loss.detach())
            examples += len(idx)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in params if p.grad is not None], cfg.max_grad_norm
            )
        if rule.grad_transform is not None:
            for name, param in zip(names, params, strict=True):
                if param.grad is not None:
                    param.grad = rule.grad_transform(name, param.grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    if rule.factors_for_step is not None:  # leave every factor of the round trainable
        for param in params:
            param.requires_grad_(True)
    return TrainResult(
        loss=sum(losses) / len(losses),
        steps=steps,
        examples=examples,
        seconds=time.perf_counter() - start,
    )


def batch_loss(model: nn.Module, batch: Batch, offsets: Tensor | None) -> Tensor:
    """Mean training loss of ``batch``: the model's own, or the logit-adjusted CE.

    With ``offsets`` (``(C,)``) the loss is ``CE(logits + offsets, labels)`` on
    classification logits ``(B, C)``; the model itself is left unchanged.
    """
    if offsets is None:
        # causal LM: the same loss without a (B, L, V) logits tensor (lm_loss)
        fast = lm_loss(model, batch)
        loss: Tensor = model(**batch).loss if fast is None else fast
        return loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()  # (B, C)
    return nn.functional.cross_entropy(logits + offsets, batch["labels"])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset[Batch],
    collate: Collate,
    *,
    task: str,
    batch_size: int,
    device: torch.device,
) -> EvalResult:
    """Mean loss and accuracy (classification) or perplexity (causal LM)."""
    model.eval()
    n = len(dataset)  # type: ignore[arg-type]
    total_loss, correct, units = 0.0, 0, 0
    for start in range(0, n, batch_size):
        items: Sequence[Batch] = [
            dataset[i] for i in range(start, min(n, start + batch_size))
        ]
        batch = to_device(collate(list(items)), device)
        if task != "classification" and (fast := lm_loss_sum(model, batch)):
            total_loss += float(fast[0])  # without the (B, L, V) logits (lm_loss)
            units += fast[1]
            continue
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if task == "classification":
            # logits: (B, C)  labels: (B,)
            total_loss += float(
                nn.functional.cross_entropy(logits, labels, reduction="sum")
            )
            correct += int((logits.argmax(-1) == labels).sum())
            units += labels.numel()
        else:
            # logits: (B, L, V) predict token t+1 from position t
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            total_loss += float(
                nn.functional.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]),
                    shift_labels.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            units += int((shift_labels != -100).sum())
    loss = total_loss / max(1, units)
    if task == "classification":
        return EvalResult(loss, correct / max(1, units), None, n)
    return EvalResult(loss, None, math.exp(min(loss, 50.0)), n)
