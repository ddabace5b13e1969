"""Typed, validated ``privacy`` group: DP mode, budget, clipping, accountant."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from fedlora.config.flat import ConfigError, check_choice, check_range, field_help
from fedlora.dp.settings import ACCOUNTANTS

PRIVACY_MODES = ("none", "dp")


@dataclass(frozen=True)
class PrivacyConfig:
    """Client-side privacy mechanism (Hydra group ``privacy``).

    ``dp`` is sample-level (epsilon, delta)-DP per client with DP-SGD (Opacus):
    Poisson sampling, flat per-sample clipping over the trainable tensors, Gaussian
    noise, and an accountant that spans every round the client takes part in.
    """

    mode: str = field(default="none", metadata=field_help("none or dp (DP-SGD)."))
    epsilon: float = field(
        default=0.0,
        metadata=field_help(
            "Target epsilon for the whole run (noise calibrated once); 0 = not set."
        ),
    )
    noise_multiplier: float = field(
        default=-1.0,
        metadata=field_help(
            "Explicit noise multiplier sigma; -1 = calibrate from epsilon."
        ),
    )
    delta: float = field(
        default=1e-5, metadata=field_help("delta of (epsilon, delta)-DP.")
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata=field_help("Per-sample clipping norm C (inf = no clipping)."),
    )
    accountant: str = field(
        default="rdp",
        metadata=field_help(f"Privacy accountant: {' or '.join(ACCOUNTANTS)}."),
    )
    secure_rng: bool = field(
        default=False,
        metadata=field_help(
            "Draw DP noise and Poisson samples from the OS CSPRNG (os.urandom, "
            "float64 Box-Muller, sum of 4 draws against floating-point attacks); "
            "false: torch's Mersenne Twister seeded with 63 OS bits (not "
            "cryptographically secure; faster)."
        ),
    )
    state_dir: str = field(
        default="",
        metadata=field_help(
            "Where clients keep their accountant; empty = <output_dir>/client-state "
            "(a site's node-config state-dir wins)."
        ),
    )

    def __post_init__(self) -> None:
        check_choice("privacy.mode", self.mode, PRIVACY_MODES)
        check_choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        if self.mode == "none":
            if self.epsilon > 0 or self.noise_multiplier >= 0:
                warnings.warn(
                    "privacy.epsilon / privacy.noise_multiplier are ignored with "
                    "privacy.mode='none'",
                    stacklevel=2,
                )
            return
        if self.epsilon < 0:
            raise ConfigError(
                f"privacy.epsilon={self.epsilon} must be > 0 (or 0 to give "
                "privacy.noise_multiplier instead)"
            )
        if self.noise_multiplier < 0 and self.noise_multiplier != -1.0:
            raise ConfigError(
                f"privacy.noise_multiplier={self.noise_multiplier} must be >= 0 "
                "(or -1 to calibrate it from privacy.epsilon)"
            )
        if self.epsilon > 0 and self.noise_multiplier >= 0:
            raise ConfigError(
                f"privacy.epsilon={self.epsilon} and privacy.noise_multiplier="
                f"{self.noise_multiplier} are both given; give one (set "
                "privacy.epsilon=0 to use the explicit noise multiplier)"
            )
        if self.epsilon == 0 and self.noise_multiplier < 0:
            raise ConfigError(
                "privacy.mode='dp' needs privacy.epsilon > 0 (a target for the whole "
                "run) or privacy.noise_multiplier >= 0"
            )
        check_range(
            "privacy.delta", self.delta, low=0, high=1, low_open=True, high_open=True
        )
        check_range("privacy.max_grad_norm", self.max_grad_norm, low=0, low_open=True)
