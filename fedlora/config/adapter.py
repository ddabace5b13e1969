"""Typed, validated ``adapter`` group: LoRA shape, variant, local update rule."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlora.config.flat import ConfigError, check_choice, check_range, field_help
from fedlora.lora.variants import VARIANTS

PEFT_TYPES = ("lora", "vera")
INITS = ("default", "pissa", "loftq")


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
    peft_type: str = field(
        default="lora",
        metadata=field_help(
            "Adapter family: lora (B A per matrix, with use_dora/use_rslora), or "
            "vera [Kopiczko et al., ICLR 2024] (peft VeraConfig): random A and B "
            "shared by all matrices, regenerated at every site from the run seed "
            "and never sent; only the vectors lambda_d (r) and lambda_b (d_out) "
            "per matrix are trained and sent. VeRA ignores alpha."
        ),
    )
    rank: int = field(
        default=8,
        metadata=field_help("LoRA rank r (VeRA: rank of the shared projections)."),
    )
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
    init: str = field(
        default="default",
        metadata=field_help(
            "LoRA initialisation: default (A random from the seed, B zero), or "
            "pissa (PiSSA / FeDeRA: A and B from the top-r singular vectors of "
            "each adapted W, which becomes the residual W - s B A; float64 SVD, "
            "residual cached once per site, quantised to NF4 when the base is), "
            "or loftq (LoftQ, NF4 base only: A and B from the top-r SVD of the "
            "quantisation error W - NF4(W); the base stays the standard one)."
        ),
    )
    vera_d_initial: float = field(
        default=0.1,
        metadata=field_help("VeRA: initial value of every lambda_d (peft d_initial)."),
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
        check_choice("adapter.peft_type", self.peft_type, PEFT_TYPES)
        check_choice("adapter.init", self.init, INITS)
        check_range("adapter.rank", self.rank, low=1)
        check_range("adapter.vera_d_initial", self.vera_d_initial, low=0, low_open=True)
        check_range("adapter.alpha", self.alpha, low=0, low_open=True)
        check_range("adapter.dropout", self.dropout, low=0, high=1, high_open=True)
        check_range("adapter.lr_ratio_b", self.lr_ratio_b, low=0, low_open=True)
        check_range("adapter.lr_ratio_head", self.lr_ratio_head, low=0, low_open=True)
        options = {"use_dora": self.use_dora, "use_rslora": self.use_rslora}
        lora_only = [f"adapter.{n}=true" for n, on in options.items() if on]
        if self.peft_type == "vera" and lora_only:
            raise ConfigError(
                f"adapter.peft_type=vera with {' and '.join(lora_only)}: DoRA and "
                "rsLoRA are options of LoRA's B A; VeRA scales shared projections by "
                "trained vectors. Use peft_type=lora for them"
            )
        if self.init != "default" and (self.peft_type != "lora" or self.use_dora):
            other = "peft_type=vera" if self.peft_type != "lora" else "use_dora=true"
            raise ConfigError(
                f"adapter.init={self.init} with adapter.{other}: it initialises "
                "LoRA's B A from an SVD; use it with peft_type=lora and use_dora=false"
            )
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            raise ConfigError(
                f"adapter.target_modules={list(self.target_modules)}: 'all-linear' "
                "cannot be combined with explicit module names"
            )
