"""Exact per-sample gradients of VeRA's scaling vectors, for Opacus.

peft's VeRA layer computes, for an input ``x`` of shape ``(n, ..., d_in)``::

    y = base(x) + lambda_b * ((lambda_d * (x @ A_s.T)) @ B_s.T)

with the shared frozen projections sliced to the layer (``A_s = A[:, :d_in]``,
``(r, d_in)``; ``B_s = B[:d_out, :]``, ``(d_out, r)``) and the trained vectors
``lambda_d`` ``(r,)`` and ``lambda_b`` ``(d_out,)``. The vectors live in
``nn.ParameterDict``s, which have no forward of their own, so Opacus' per-module
hooks never see their inputs. Here the VeRA layer itself is the hooked module:
with ``g = dL/dy`` ``(n, ..., d_out)``, ``u = x @ A_s.T`` and ``w = (lambda_d * u)
@ B_s.T``, example i's gradients are

    dL_i/dlambda_b = sum over positions of g_i * w_i            (d_out,)
    dL_i/dlambda_d = sum over positions of ((g_i * lambda_b) @ B_s) * u_i   (r,)

VeRA's dropout draws a mask the hooks cannot see; the rule refuses an active one
(``adapter.dropout`` must be 0 under DP, which is its default).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from torch import Tensor, nn


@cache
def vera_layer_type() -> type[nn.Module]:
    """Return peft's VeRA ``Linear`` (one class for full-precision and 4-bit)."""
    from peft.tuners.vera.layer import Linear

    return Linear


def is_vera_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a peft VeRA layer (vectors in child ParameterDicts)."""
    return isinstance(module, vera_layer_type())


def vera_dropout_error(name: str, layer: Any) -> str | None:
    """Why the per-sample rule cannot serve this layer in training, or None."""
    active = [
        adapter
        for adapter in layer.active_adapters
        if adapter in layer.vera_dropout
        and isinstance(layer.vera_dropout[adapter], nn.Dropout)
        and layer.vera_dropout[adapter].p > 0
    ]
    if not active:
        return None
    return (
        f"{name} (VeRA Linear): dropout {layer.vera_dropout[active[0]].p} draws a "
        "mask the per-sample rule does not see; set adapter.dropout=0 under DP"
    )


def vera_grad_sampler(
    layer: Any, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of the active adapters' trainable vectors.

    Parameters
    ----------
    layer : peft VeRA ``Linear``
        The hooked layer.
    activations : list of Tensor
        Its forward inputs; ``activations[0]`` is ``x``, ``(n, ..., d_in)``.
    backprops : Tensor
        ``dL/dy`` for the summed loss, ``(n, ..., d_out)``.

    Returns
    -------
    dict
        ``lambda_b -> (n, d_out)`` and ``lambda_d -> (n, r)``, for the vectors with
        ``requires_grad`` only (FFA-VeRA freezes ``lambda_d``).
    """
    if layer.disable_adapters or layer.merged:
        raise ValueError(
            "a VeRA layer with its adapters disabled or merged has no vectors in "
            "its forward: nothing to differentiate per sample"
        )
    error = vera_dropout_error(type(layer).__name__, layer)
    if error is not None:
        raise ValueError(error)
    x = activations[0]
    n = x.shape[0]
    out: dict[nn.Parameter, Tensor] = {}
    for adapter in layer.active_adapters:
        if adapter not in layer.vera_lambda_d:
            continue
        lambda_d = layer.vera_lambda_d[adapter]
        lambda_b = layer.vera_lambda_b[adapter]
        dtype = lambda_d.dtype
        a = layer.vera_A[adapter][:, : layer.in_features].to(x.device, dtype)
        b = layer.vera_B[adapter][: layer.out_features, :].to(x.device, dtype)
        xs = x.to(dtype).reshape(n, -1, x.shape[-1])  # (n, T, d_in)
        g = backprops.to(dtype).reshape(n, -1, backprops.shape[-1])  # (n, T, d_out)
        u = xs @ a.T  # (n, T, r)
        if lambda_b.requires_grad:
            w = (u * lambda_d.detach()) @ b.T  # (n, T, d_out)
            out[lambda_b] = torch.einsum("nto,nto->no", g, w)
        if lambda_d.requires_grad:
            back = (g * lambda_b.detach()) @ b  # (n, T, r)
            out[lambda_d] = torch.einsum("ntr,ntr->nr", back, u)
    return out


def extra_grad_samplers() -> dict[type[Any], Any]:
    """Layer type -> per-sample rule, added to Opacus' own for our wrapper only."""
    return {vera_layer_type(): vera_grad_sampler}
