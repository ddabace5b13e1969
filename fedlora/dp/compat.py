"""What Opacus can privatise, and the per-sample-gradient wrapper we use.

Opacus (1.6) computes per-sample gradients only for modules that own a trainable
parameter. In ``hooks`` mode it uses an exact, hand-written rule per layer type
(``nn.Linear``, ``nn.Embedding``, norms, convs, ...) and silently falls back to
functorch for any other type: a vmap of the module's forward on single examples,
which fails on non-functional layers (bitsandbytes) and is wrong for layers that
mix examples. So the ``hooks`` check refuses trainable modules without a rule.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Iterator
from functools import cache
from typing import Any

import torch
from torch import Tensor, nn

from fedlora.dp.vera import extra_grad_samplers, is_vera_layer, vera_dropout_error

# grad_sample_mode -> force_functorch flag of GradSampleModule; first is the default.
# "ghost" (needs a criterion wrapper) and "ew" (its wrapper takes the inputs only
# positionally, not as HF keyword arguments) are not offered.
GRAD_SAMPLE_MODES = {"hooks": False, "functorch": True}


def check_grad_sample_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is a key of :data:`GRAD_SAMPLE_MODES`."""
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(
            f"grad_sample_mode={mode!r} is not supported; use one of "
            f"{list(GRAD_SAMPLE_MODES)}"
        )


def _module_errors(name: str, module: nn.Module, mode: str) -> list[str]:
    """Why Opacus cannot privatise this trainable module (empty if it can)."""
    from opacus.validators import ModuleValidator

    label = f"{name or '<root>'} ({type(module).__name__})"
    params = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    errors = []
    if mode == "hooks" and type(module) not in grad_sample_module_cls().GRAD_SAMPLERS:
        errors.append(
            f"{label}: no Opacus per-sample gradient rule for this layer type "
            f"(trainable {params}); freeze it, register one with "
            "opacus.grad_sample.register_grad_sampler, or use "
            "grad_sample_mode='functorch' if its forward treats examples independently"
        )
    if any(True for _ in module.buffers()):
        # Buffers (e.g. BatchNorm running stats) are updated from the whole batch.
        errors.append(f"{label}: a trainable module with buffers is not private")
    validator = ModuleValidator.VALIDATORS.get(type(module))
    if validator is not None:
        errors.extend(f"{label}: {err}" for err in validator(module))
    return errors


def _vera_errors(name: str, layer: Any, mode: str) -> list[str]:
    """Why fedlora's VeRA rule (:mod:`fedlora.dp.vera`) cannot serve this layer."""
    errors = []
    if mode != "hooks":
        errors.append(
            f"{name} (VeRA Linear): VeRA's vectors get per-sample gradients from "
            "fedlora's exact rule, which runs in grad_sample_mode='hooks' only; "
            "functorch would vmap the frozen (4-bit) base layer"
        )
    dropout = vera_dropout_error(name, layer)
    if dropout is not None:
        errors.append(dropout)
    idle = [
        f"{vectors}.{adapter}"
        for vectors in ("vera_lambda_b", "vera_lambda_d")
        for adapter, p in getattr(layer, vectors).items()
        if p.requires_grad and adapter not in layer.active_adapters
    ]
    others = [
        n
        for n, p in layer.named_parameters()
        if p.requires_grad and not n.startswith(("vera_lambda_b.", "vera_lambda_d."))
    ]
    if others:
        errors.append(
            f"{name} (VeRA Linear): trainable {others[:3]} inside the layer get no "
            "per-sample gradient from VeRA's rule; freeze them"
        )
    if idle:
        errors.append(
            f"{name} (VeRA Linear): trainable vectors of inactive adapters {idle} "
            "take no part in the forward; freeze them or activate their adapter"
        )
    return errors


def check_opacus_compatible(
    model: nn.Module, *, grad_sample_mode: str = "hooks"
) -> None:
    """Raise if Opacus cannot compute exact per-sample gradients for ``model``.

    Only modules owning a parameter with ``requires_grad`` are checked: the frozen
    (possibly 4-bit) base is never differentiated per sample.

    Parameters
    ----------
    model : nn.Module
        The model as it will be wrapped (trainable flags set).
    grad_sample_mode : str (default: "hooks")
        ``"hooks"`` requires a registered per-layer rule; ``"functorch"`` accepts
        any module without buffers.

    Raises
    ------
    ValueError
        Naming every offending module and its type, and the fix.
    """
    check_grad_sample_mode(grad_sample_mode)
    vera = [
        (name, module)
        for name, module in model.named_modules()
        if is_vera_layer(module) and any(p.requires_grad for p in module.parameters())
    ]
    errors = [
        err
        for name, module in vera
        for err in _vera_errors(name, module, grad_sample_mode)
    ]
    # a VeRA layer's vectors sit in child ParameterDicts; its own rule covers them
    covered = tuple(f"{name}." if name else "" for name, _ in vera)
    errors += [
        err
        for name, module in model.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
        and not name.startswith(covered)
        for err in _module_errors(name, module, grad_sample_mode)
    ]
    if errors:
        raise ValueError(
            "Opacus cannot compute per-sample gradients for these trainable "
            "modules:\n  " + "\n  ".join(errors)
        )


@cache
def grad_sample_module_cls() -> type[Any]:
    """Opacus' ``GradSampleModule`` that tolerates factors frozen after wrapping.

    Opacus hooks every module trainable at wrap time. When a factor is frozen later
    (LA-LoRA, RoLoRA), its forward hook records no activations but autograd still
    calls its backward hook (its input needs a gradient), and Opacus raises
    ``ValueError: No activations detected for <class 'torch.nn.modules.linear.Linear'>,
    run forward after add_hooks(model)``. This subclass skips frozen modules there.

    It also hooks peft's VeRA layers as a whole, with the exact rule of
    :mod:`fedlora.dp.vera` (Opacus alone would hook the vectors' ParameterDicts,
    whose forward never runs). The rule is added to this class's table only, not
    to Opacus' global one.
    """
    from opacus.grad_sample import GradSampleModule
    from opacus.utils.module_utils import requires_grad, trainable_parameters

    def trains(module: nn.Module) -> bool:
        # a VeRA layer trains through its child ParameterDicts
        return bool(requires_grad(module, recurse=is_vera_layer(module)))

    class ToggleableGradSampleModule(GradSampleModule):  # type: ignore[misc]
        # a live view: rules registered later with register_grad_sampler show too
        GRAD_SAMPLERS = ChainMap(extra_grad_samplers(), GradSampleModule.GRAD_SAMPLERS)

        def iterate_submodules(self, module: nn.Module) -> Iterator[nn.Module]:
            if is_vera_layer(module):
                if trains(module):
                    yield module  # its rule covers the vectors: no recursion
                return
            yield from super().iterate_submodules(module)

        def capture_activations_hook(
            self, module: Any, forward_input: list[Tensor], output: Tensor
        ) -> None:
            if not is_vera_layer(module):
                super().capture_activations_hook(module, forward_input, output)
                return
            # Opacus' own hook checks only the layer's direct parameters
            if not (trains(module) and module.training and torch.is_grad_enabled()):
                return
            if not self.hooks_enabled:
                return
            if not hasattr(module, "activations"):
                module.activations = []
            module.activations.append([t.detach() for t in forward_input])
            for _, p in trainable_parameters(module):
                p._forward_counter += 1

        def capture_backprops_hook(
            self, module: nn.Module, *args: Any, **kwargs: Any
        ) -> None:
            if not trains(module):
                return
            super().capture_backprops_hook(module, *args, **kwargs)

    return ToggleableGradSampleModule
