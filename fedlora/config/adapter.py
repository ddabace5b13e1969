"""Typed, validated ``adapter`` group: LoRA shape, variant, local update rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.config.flat import ConfigError, check_choice, check_range, field_help
from fedlora.lora.variants import VARIANTS


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA adapter and local update rule (Hydra group ``adapter``)."""

    variant: str = field(
        default="lora",
        metadata=field_help(
            "Local update rule: "
            + "; ".join(
                f"{n}: {VARIANTS.get(n).summary.rstrip('.')}" for n in VARIANTS.names()
            )
        ),
    )
    rank: int = field(default=8, metadata=field_help("LoRA rank r."))
    alpha: float = field(
        default=16.0, metadata=field_help("LoRA alpha; scale = alpha/r.")
    )
    dropout: float = field(
        default=0.0, metadata=field_help("Dropout on the LoRA input.")
    )
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata=field_help(
            "Module names, 'all-linear', or empty for the preset default."
        ),
    )
    use_rslora: bool = field(
        default=False,
        metadata=field_help("rsLoRA scaling alpha/sqrt(r) instead of alpha/r."),
    )
    use_dora: bool = field(
        default=False,
        metadata=field_help(
            "DoRA [Liu et al., ICML 2024] (peft use_dora; QDoRA on a 4-bit base): "
            "W' = m * (W + s B A) / ||W + s B A|| per output row; the magnitude m "
            "(d_out per matrix) is trained, sent and averaged with B."
        ),
    )
    train_head: bool = field(
        default=True,
        metadata=field_help("Classification: train and aggregate the task head too."),
    )
    lr_ratio_b: float = field(
        default=1.0,
        metadata=field_help(
            "LoRA+ [Hayou et al., ICML 2024]: learning rate of B relative to A, "
            "lambda = lr_B / lr_A; 1 = plain LoRA, the paper suggests starting at "
            "2^4 = 16 (LA-LoRA's code uses 2)."
        ),
    )
    lr_ratio_head: float = field(
        default=30.0,
        metadata=field_help(
            "Learning rate of the task head relative to A: a randomly initialised "
            "head must grow ~20x in norm, which lr alone does not reach in a short run."
        ),
    )
    lowpass: bool = field(
        default=True,
        metadata=field_help(
            "la_lora: low-pass filter [1,4,6,4,1]/16 on the gradients."
        ),
    )

    def __post_init__(self) -> None:
        check_choice("adapter.variant", self.variant, VARIANTS.names())
        check_range("adapter.rank", self.rank, low=1)
        check_range("adapter.alpha", self.alpha, low=0, low_open=True)
        check_range("adapter.dropout", self.dropout, low=0, high=1, high_open=True)
        check_range("adapter.lr_ratio_b", self.lr_ratio_b, low=0, low_open=True)
        check_range("adapter.lr_ratio_head", self.lr_ratio_head, low=0, low_open=True)
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(
                f"adapter.target_modules={list(self.target_modules)}: 'all-linear' "
                "cannot be combined with explicit module names"
            )
