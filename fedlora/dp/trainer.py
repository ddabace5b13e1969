"""One client's sample-level DP-SGD (Opacus) over K local steps.

Each step: a Poisson batch (:func:`poisson_batch`), per-sample gradients of each
example's own loss (:func:`per_sample_loss`) on the currently trainable tensors,
flat clipping to C over those tensors jointly, Gaussian noise ``N(0, sigma^2 C^2)``,
division by the expected batch size b, optional post-processing, one AdamW update,
and one ledger step. Frozen tensors get neither gradient, noise nor weight decay.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fedlora.dp.accounting import PrivacyLedger
from fedlora.dp.compat import (
    GRAD_SAMPLE_MODES,
    check_opacus_compatible,
    grad_sample_module_cls,
)
from fedlora.dp.randomness import DPRandom, TorchRandom
from fedlora.dp.settings import DPSettings

IGNORE_INDEX = -100  # label positions left out of the causal LM loss
GradTransform = Callable[[str, Tensor], Tensor]
# Attributes Opacus sets on parameters / modules; detach() removes every one.
_PARAM_ATTRS = (
    "grad_sample",
    "summed_grad",
    "_forward_counter",
    "_current_grad_sample",
)
_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


def poisson_batch(
    n: int, sample_rate: float, source: torch.Generator | DPRandom
) -> Tensor:
    """Draw a Poisson batch: each of ``n`` record indices is kept w.p. q.

    ``source`` is a torch generator or a :class:`~fedlora.dp.randomness.DPRandom`
    (``SecureRandom`` draws the uniforms from the OS CSPRNG).

    Returns
    -------
    Tensor
        Sorted int64 indices, shape ``(B,)``, ``B ~ Binomial(n, q)``; may be empty.
    """
    if isinstance(source, torch.Generator):
        u = torch.rand(n, generator=source)  # (n,)
    else:
        u = source.uniform(n)  # (n,)
    return (u < sample_rate).nonzero().flatten()


def _add_noise(optimizer: Any, rng: DPRandom) -> None:
    """Opacus' ``add_noise`` with the noise drawn from ``rng`` (then moved to p).

    Same result as ``DPOptimizer.add_noise``: ``p.grad = summed clipped grads +
    N(0, (sigma C)^2)``; drawn on the CPU, so a CPU generator also serves CUDA.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    std = optimizer.noise_multiplier * optimizer.max_grad_norm
    for p in optimizer.params:
        _check_processed_flag(p.summed_grad)
        summed = p.summed_grad
        noise = (
            torch.zeros_like(summed)
            if std == 0
            else rng.normal(summed.shape, std).to(summed.device, summed.dtype)
        )
        p.grad = (summed + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


def per_sample_loss(logits: Tensor, labels: Tensor, *, task: str) -> Tensor:
    """Loss of each example on its own, shape ``(B,)``, in float32.

    Parameters
    ----------
    logits : Tensor
        ``(B, C)`` for ``classification``; ``(B, T, V)`` for ``causal_lm``.
    labels : Tensor
        ``(B,)`` class ids, or ``(B, T)`` token ids with ``-100`` on positions
        outside the loss (unshifted, as the collator gives them).
    task : str
        ``"classification"`` (cross-entropy) or ``"causal_lm"`` (mean cross-entropy
        over that example's own target tokens, predicting token t+1 from t).

    Notes
    -----
    The DP loss is ``per_sample_loss(...).sum()``: each example's gradient then
    depends on that example only. Hugging Face's causal LM loss is a mean over all
    target tokens of the batch, which would scale each example's gradient by the
    batch's token count and leak the other examples into it.
    """
    logits = logits.float()
    if task == "classification":
        return nn.functional.cross_entropy(logits, labels, reduction="none")
    if task != "causal_lm":
        raise ValueError(f"task={task!r} must be 'classification' or 'causal_lm'")
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    token_loss = nn.functional.cross_entropy(
        shift_logits.transpose(1, 2),  # (B, V, T-1)
        shift_labels,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # (B, T-1), 0 where ignored
    targets = (shift_labels != IGNORE_INDEX).sum(dim=1)  # (B,)
    # An example without targets contributes 0 (not 0/0 = nan).
    return token_loss.sum(dim=1) / targets.clamp(min=1)


def _param_groups(
    params: Mapping[str, nn.Parameter], lr_scale: Mapping[str, float]
) -> list[dict[str, Any]]:
    """One AdamW group per learning-rate factor; a name matches at most one key."""
    factors: dict[str, float] = {}
    for name in params:
        hits = [key for key in lr_scale if key in name]
        if len(hits) > 1:
            raise ValueError(
                f"parameter {name!r} matches several lr_scale keys {hits}; make them "
                "unambiguous"
            )
        factors[name] = float(lr_scale[hits[0]]) if hits else 1.0
    unused = [key for key in lr_scale if not any(key in name for name in params)]
    if unused:
        raise ValueError(
            f"lr_scale keys {unused} match no trainable parameter (e.g. "
            f"{next(iter(params))!r})"
        )
    groups = []
    for factor in sorted(set(factors.values())):
        members = [params[n] for n in params if factors[n] == factor]
        groups.append({"params": members, "lr_scale": factor})
    return groups


class DPTrainer:
    """DP-SGD steps with AdamW on one client's PEFT model (Opacus, Poisson batches).

    The trainer owns the privacy bookkeeping of its steps: every :meth:`step`,
    including one on an empty Poisson batch, calls ``ledger.step(sigma, q)`` once.
    The caller keeps ``ledger`` across rounds (and saves it); the trainer lives for
    one round and must be :meth:`detach` ed before the model is used otherwise.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face / PEFT model returning ``.logits``. Every tensor that will
        ever be trained this round must have ``requires_grad`` now (both LoRA
        factors for alternating schemes; Opacus hooks only modules trainable at
        wrap time, so a factor unfrozen later would get no per-sample gradients);
        toggle ``requires_grad`` between steps freely.
    settings : DPSettings
        sigma, C, q, delta, accountant and the expected batch size b.
    ledger : PrivacyLedger
        The client's cumulative ledger (same accountant and delta as ``settings``).
    lr : float
        AdamW learning rate (see :meth:`set_lr` for schedules).
    weight_decay : float
        AdamW decoupled weight decay (applied only to tensors trained in a step).
    lr_scale : Mapping[str, float] or None (default: None)
        Learning-rate factors by parameter-name substring, e.g. ``{"lora_B": 2.0}``
        for LA-LoRA's ``lr_B = 2 lr_A``; unmatched tensors use 1. None: all 1.
    grad_sample_mode : str (default: "hooks")
        ``"hooks"`` (exact per-layer rules, fastest here) or ``"functorch"``.
    rng : DPRandom or None (default: None)
        Source of the DP noise (:mod:`fedlora.dp.randomness`); None: torch's
        generator seeded from 63 OS bits.

    Notes
    -----
    The privatised gradient is ``g = (sum_i min(1, C / ||g_i||) g_i + N(0, s^2 C^2))
    / b`` with ``g_i`` the gradient of ``per_sample_loss`` of example i. With
    sigma = 0 and C = inf (any C above every ``||g_i||``), one step equals one plain
    AdamW step on ``per_sample_loss(logits, labels, task=task).sum() / b``: for
    classification with a batch of exactly b examples that is Hugging Face's
    ``model(**batch).loss``; for causal LM only when every example has the same
    number of target tokens.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        settings: DPSettings,
        ledger: PrivacyLedger,
        lr: float,
        weight_decay: float,
        lr_scale: Mapping[str, float] | None = None,
        grad_sample_mode: str = "hooks",
        rng: DPRandom | None = None,
    ) -> None:
        from opacus.optimizers import DPOptimizer

        if (ledger.accountant, ledger.delta) != (settings.accountant, settings.delta):
            raise ValueError(
                f"ledger ({ledger.accountant}, delta={ledger.delta}) does not match "
                f"settings ({settings.accountant}, delta={settings.delta})"
            )
        if hasattr(model, "autograd_grad_sample_hooks"):
            raise RuntimeError(
                "model still carries Opacus hooks; call detach() on the previous "
                "DPTrainer before wrapping it again"
            )
        check_opacus_compatible(model, grad_sample_mode=grad_sample_mode)
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self._params:
            raise ValueError("model has no trainable parameters to privatise")
        self._model = model
        self.settings = settings
        self.ledger = ledger
        self._gsm = grad_sample_module_cls()(
            model,
            batch_first=True,
            loss_reduction="sum",  # per-sample grads of each example's own loss
            strict=True,
            force_functorch=GRAD_SAMPLE_MODES[grad_sample_mode],
        )
        groups = _param_groups(self._params, lr_scale or {})
        self._optimizer = DPOptimizer(
            torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay),
            noise_multiplier=settings.noise_multiplier,
            max_grad_norm=settings.max_grad_norm,
            expected_batch_size=settings.expected_batch_size,
            loss_reduction="mean",  # here: divide (clipped sum + noise) by b
        )
        noise_source = rng if rng is not None else TorchRandom()
        # every noise draw goes through rng (the secure source cannot be a
        # torch.Generator, which is what Opacus would take)
        self._optimizer.add_noise = functools.partial(
            _add_noise, self._optimizer, noise_source
        )
        self.set_lr(lr)
        self._attached = True

    @property
    def param_names(self) -> list[str]:
        """Names (as in ``model.named_parameters()``) of the tensors it may train."""
        return list(self._params)

    def set_lr(self, lr: float) -> None:
        """Set the base learning rate (each group gets ``lr * its lr_scale``)."""
        for group in self._optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def _active(self) -> dict[str, nn.Parameter]:
        """Return the trainable wrapped tensors; refuse tensors unfrozen after wrap."""
        late = [
            n
            for n, p in self._model.named_parameters()
            if p.requires_grad and n not in self._params
        ]
        if late:
            raise ValueError(
                f"{late[:3]} became trainable after DPTrainer wrapped the model; "
                "Opacus has no per-sample hooks for them. Make every tensor of the "
                "round trainable before building the DPTrainer, then freeze per step"
            )
        active = {n: p for n, p in self._params.items() if p.requires_grad}
        if not active:
            raise ValueError("no wrapped parameter has requires_grad: nothing to step")
        return active

    def _clear(self) -> None:
        """Drop grads and per-sample grads of every wrapped tensor, frozen or not."""
        for p in self._params.values():
            p.grad = None
            # Opacus monkeypatches these attributes onto parameters.
            setattr(p, "grad_sample", None)  # noqa: B010
            setattr(p, "summed_grad", None)  # noqa: B010

    def _per_sample_grads(self, batch: Mapping[str, Tensor], task: str) -> float:
        """Forward + backward of the summed per-sample loss; mean loss for logging."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        self._gsm.train()
        logits = self._gsm(**inputs).logits
        losses = per_sample_loss(logits, batch["labels"], task=task)  # (B,)
        torch.autograd.backward(losses.sum())
        return float(losses.detach().mean())

    def step(
        self,
        batch: Mapping[str, Tensor],
        *,
        task: str,
        grad_transform: GradTransform | None = None,
    ) -> float:
        """One DP-SGD step on the currently trainable tensors; one ledger step.

        Parameters
        ----------
        batch : Mapping[str, Tensor]
            A collated Poisson batch with ``labels``; ``B = 0`` is allowed.
        task : str
            ``"classification"`` or ``"causal_lm"`` (see :func:`per_sample_loss`).
        grad_transform : Callable[[str, Tensor], Tensor] or None (default: None)
            ``(param_name, privatised_grad) -> grad`` applied after clipping, noise
            and the division by b, before the AdamW update (post-processing, free
            in privacy; e.g. LA-LoRA's :func:`~fedlora.dp.lowpass_filter`).

        Returns
        -------
        float
            Mean per-sample loss of the batch (not private; logging only), nan for
            an empty batch.
        """
        if not self._attached:
            raise RuntimeError("DPTrainer.step after detach(); build a new DPTrainer")
        active = self._active()
        self._clear()
        if len(batch["labels"]) == 0:
            # An HF forward on 0 examples raises (cannot reshape an empty tensor);
            # skipping the step would under-count epsilon, so it must still add
            # noise and be counted: give every active tensor 0 per-sample grads.
            for p in active.values():
                empty = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                setattr(p, "grad_sample", empty)  # noqa: B010
            loss = math.nan
        else:
            loss = self._per_sample_grads(batch, task)
            missing = [
                n for n, p in active.items() if getattr(p, "grad_sample", None) is None
            ]
            if missing:
                raise RuntimeError(
                    f"Opacus computed no per-sample gradient for {missing[:3]} "
                    "(gradient checkpointing on? Opacus gets none through it)"
                )
        self._optimizer.pre_step()  # clip, sum, add noise, divide by b -> p.grad
        self.ledger.step(self.settings.noise_multiplier, self.settings.sample_rate)
        if grad_transform is not None:
            for name, p in active.items():
                assert p.grad is not None  # set by pre_step for every active tensor
                new = grad_transform(name, p.grad)
                if new.shape != p.shape:
                    raise ValueError(
                        f"grad_transform changed the shape of {name}: "
                        f"{tuple(p.shape)} -> {tuple(new.shape)}"
                    )
                p.grad = new
        self._optimizer.original_optimizer.step()
        self._clear()
        return loss

    def detach(self) -> nn.Module:
        """Remove Opacus hooks and attributes; return the plain model (idempotent)."""
        if self._attached:
            self._gsm.to_standard_module()  # removes hooks + per-parameter attrs
            self._attached = False
        for p in self._model.parameters():
            for attr in _PARAM_ATTRS:
                if hasattr(p, attr):
                    delattr(p, attr)
        for module in self._model.modules():
            for attr in _MODULE_ATTRS:
                if attr in module.__dict__:
                    delattr(module, attr)
        return self._model
