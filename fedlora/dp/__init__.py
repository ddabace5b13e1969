"""Sample-level DP-SGD for one client (Opacus), its accounting and LA-LoRA's filter.

``settings``: what a client calibrates; ``accounting``: the ledger that spans
rounds; ``trainer``: per-sample clipping and noise; ``randomness``: where the noise
comes from; ``filters``: LA-LoRA's low-pass filter; ``compat``: which modules Opacus
can wrap. The typed ``privacy`` config group is ``fedlora.config.privacy``.

Importing this package imports neither torch nor Opacus (so validating a config
stays light); the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "PrivacyLedger": "accounting",
    "calibrate_noise": "accounting",
    "check_opacus_compatible": "compat",
    "lowpass_filter": "filters",
    "DPSettings": "settings",
    "DPTrainer": "trainer",
    "per_sample_loss": "trainer",
    "poisson_batch": "trainer",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """Load ``name`` from its submodule on first access (PEP 562)."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'fedlora.dp' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fedlora.dp.{home}"), name)
