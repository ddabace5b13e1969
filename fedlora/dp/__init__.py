"""Sample-level DP-SGD for one client (Opacus), its accounting and LA-LoRA's filter.

Importing this package does not import Opacus; the functions that need it do.
"""

from fedlora.dp.accounting import PrivacyLedger, calibrate_noise
from fedlora.dp.compat import check_opacus_compatible
from fedlora.dp.filters import lowpass_filter
from fedlora.dp.settings import DPSettings
from fedlora.dp.trainer import DPTrainer, per_sample_loss, poisson_batch

__all__ = [
    "DPSettings",
    "DPTrainer",
    "PrivacyLedger",
    "calibrate_noise",
    "check_opacus_compatible",
    "lowpass_filter",
    "per_sample_loss",
    "poisson_batch",
]
