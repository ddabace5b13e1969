"""Where DP-SGD's randomness comes from: torch's generator or the OS CSPRNG.

DP-SGD draws two kinds of randomness per step: the Poisson sample (which records
take part) and the Gaussian noise. Both must be unpredictable to whoever sees the
released adapters, or the guarantee is void.

* :class:`TorchRandom` (``privacy.secure_rng=false``, the default): torch's
  Mersenne Twister, seeded with 63 bits from the OS (``secrets.randbits``) for
  every client round, with Opacus' plain ``torch.normal``. MT19937 is not a
  cryptographic generator: its state can be recovered from enough outputs, and
  plain Gaussian sampling is open to floating-point attacks. Fast; fine for
  experiments, not what a deployment that must withstand an attacker should use.
* :class:`SecureRandom` (``privacy.secure_rng=true``): every uniform comes from
  ``os.urandom`` (the kernel's CSPRNG), Gaussians by the Box-Muller transform in
  float64, and each noise value is the sum of four such draws divided by two
  (Holohan and Braghin's mitigation of floating-point attacks, as in Opacus'
  ``secure_mode``, which itself needs the unmaintained ``torchcsprng``).
  About 64 bytes of OS randomness per noised parameter per step.
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

_MANTISSA = 2.0**-53


class DPRandom(Protocol):
    """Source of DP-SGD's sampling and noise."""

    def uniform(self, n: int) -> Tensor:
        """``n`` uniforms in ``[0, 1)``, shape ``(n,)``."""
        ...

    def normal(self, shape: torch.Size, std: float) -> Tensor:
        """Gaussian noise ``N(0, std^2)`` of ``shape`` (float32 or float64)."""
        ...


class TorchRandom:
    """torch's Mersenne Twister; seeded from 63 OS bits unless ``seed`` is given.

    ``seed`` is for sigma = 0 runs (no privacy claimed), which must be
    reproducible from the run seed.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = secrets.randbits(63) if seed is None else seed
        self.generator = torch.Generator().manual_seed(self.seed)

    def uniform(self, n: int) -> Tensor:
        """``torch.rand`` (float32) on the seeded generator."""
        return torch.rand(n, generator=self.generator)

    def normal(self, shape: torch.Size, std: float) -> Tensor:
        """``torch.normal`` on the seeded generator (float32)."""
        return torch.normal(0.0, std, size=tuple(shape), generator=self.generator)


def urandom_uniform(n: int) -> np.ndarray:
    """Draw ``n`` float64 uniforms in ``[0, 1)``, 53 bits each, from os.urandom."""
    words = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)  # (n,)
    return (words >> np.uint64(11)).astype(np.float64) * _MANTISSA


def box_muller(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Map two arrays of uniforms in ``[0, 1)`` (same shape) to standard normals.

    ``1 - u1`` lies in ``(0, 1]``, so the logarithm is finite.
    """
    radius: np.ndarray = np.sqrt(-2.0 * np.log1p(-u1))
    return radius * np.cos(2.0 * math.pi * u2)


class SecureRandom:
    """DP randomness from the OS CSPRNG (``os.urandom``), float64 Box-Muller.

    ``normal`` returns ``(z1 + z2 + z3 + z4) / 2`` times ``std`` with four
    independent standard normals ``z_k``: still ``N(0, std^2)``, but an attacker
    who reads one released float can no longer invert it to the uniforms behind it.
    """

    draws = 4

    def uniform(self, n: int) -> Tensor:
        """``n`` CSPRNG uniforms in ``[0, 1)``."""
        return torch.from_numpy(urandom_uniform(n))

    def normal(self, shape: torch.Size, std: float) -> Tensor:
        """CSPRNG Gaussian noise of ``shape`` (float64)."""
        n = math.prod(shape)
        total = np.zeros(n, dtype=np.float64)
        for _ in range(self.draws):
            total += box_muller(urandom_uniform(n), urandom_uniform(n))
        return torch.from_numpy(total * (std / math.sqrt(self.draws))).view(
            tuple(shape)
        )


def dp_random(*, secure: bool, seed: int | None = None) -> DPRandom:
    """Return a client's source for one round: OS CSPRNG or torch's MT."""
    if secure:
        return SecureRandom()
    return TorchRandom(seed)
