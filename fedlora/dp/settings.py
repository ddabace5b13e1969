"""Plain DP-SGD settings of one client, validated once (the lead maps the config)."""

from __future__ import annotations

from dataclasses import dataclass

# Accountants Opacus 1.6 provides that we support; error text is built from this.
ACCOUNTANTS = ("rdp", "prv")


def check_accountant(accountant: str) -> None:
    """Raise ``ValueError`` unless ``accountant`` is one of :data:`ACCOUNTANTS`."""
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"accountant={accountant!r} is not supported; use one of "
            f"{list(ACCOUNTANTS)}"
        )


def check_delta(delta: float) -> None:
    """Raise ``ValueError`` unless ``0 < delta < 1``."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta={delta!r} must be in (0, 1)")


def check_sample_rate(sample_rate: float) -> None:
    """Raise ``ValueError`` unless ``0 < sample_rate <= 1``."""
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(f"sample_rate={sample_rate!r} must be in (0, 1]")


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP-SGD of one client (Poisson batches, per-sample clip, noise).

    Parameters
    ----------
    noise_multiplier : float
        sigma; the noise added to the clipped sum has std ``sigma * C``.
    max_grad_norm : float
        C, flat per-sample clipping over all currently trainable tensors jointly.
    sample_rate : float
        q = expected_batch_size / N_i (Poisson sampling).
    delta : float
        Target delta of the (epsilon, delta) guarantee.
    accountant : str
        ``"rdp"`` or ``"prv"``.
    expected_batch_size : int
        b = q * N_i; the privatised gradient is ``(sum of clipped + noise) / b``.
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    delta: float
    accountant: str
    expected_batch_size: int

    def __post_init__(self) -> None:
        if not self.noise_multiplier >= 0.0:
            raise ValueError(f"noise_multiplier={self.noise_multiplier!r} must be >= 0")
        if not self.max_grad_norm > 0.0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be > 0")
        check_sample_rate(self.sample_rate)
        check_delta(self.delta)
        check_accountant(self.accountant)
        if self.expected_batch_size < 1:
            raise ValueError(
                f"expected_batch_size={self.expected_batch_size!r} must be >= 1"
            )
