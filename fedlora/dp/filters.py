"""LA-LoRA's low-pass filter of a privatised LoRA gradient (paper version, §3.4).

A fixed 5-tap binomial kernel ``[1, 4, 6, 4, 1] / 16`` (about a Gaussian with std of
one entry) is applied along the feature axis only, so the rank axis is never mixed:
each row of grad(A) ``(r, d_in)`` and each column of grad(B) ``(d_out, r)``. It runs
on the already privatised gradient, so it is post-processing and costs no privacy.
"""

from __future__ import annotations

import torch
from torch import Tensor

KERNEL = (1.0, 4.0, 6.0, 4.0, 1.0)  # divided by 16 = sum(KERNEL)
_HALF = len(KERNEL) // 2  # padding on each side: 2


def _symmetric_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Index a length-``n`` axis padded by ``pad`` with half-sample symmetry.

    ``[x1, x0 | x0 ... x_{n-1} | x_{n-1}, x_{n-2}]`` (the edge entry is repeated, as
    numpy's ``mode="symmetric"``); folding modulo ``2n`` keeps it valid for n < pad.
    """
    i = torch.arange(-pad, n + pad, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def _smooth_last_axis(x: Tensor) -> Tensor:
    """Convolve every 1-D slice along the last axis with the binomial kernel."""
    n = x.shape[-1]
    padded = x.index_select(-1, _symmetric_index(n, _HALF, x.device))  # (..., n + 4)
    out = torch.zeros_like(x)
    for k, w in enumerate(KERNEL):  # the kernel is symmetric: no flip needed
        out += w * padded[..., k : k + n]
    return out / sum(KERNEL)


def lowpass_filter(grad: Tensor, factor: str) -> Tensor:
    """Smooth a LoRA factor's gradient along its feature axis; a pure function.

    Parameters
    ----------
    grad : Tensor
        ``(r, d_in)`` for ``lora_A`` or ``(d_out, r)`` for ``lora_B``.
    factor : str
        ``"lora_A"`` (filter each row along d_in) or ``"lora_B"`` (filter each
        column along d_out).

    Returns
    -------
    Tensor
        A new tensor of the same shape and dtype; a constant slice is unchanged.
    """
    if grad.dim() != 2:
        raise ValueError(
            "lowpass_filter expects a 2-D LoRA factor gradient, got "
            f"{tuple(grad.shape)}"
        )
    if factor == "lora_A":
        return _smooth_last_axis(grad)  # rows: (r, d_in)
    if factor == "lora_B":
        return _smooth_last_axis(grad.t()).t().contiguous()  # columns: (d_out, r)
    raise ValueError(f"factor={factor!r} must be 'lora_A' or 'lora_B'")
