"""Local update rules (adapter variants) and their registry.

A variant decides which LoRA factors a client trains in a given round and which
tensors travel. Registration goes through ``register_variant`` so names, CLI choices
and error messages all come from one place (see CONTRIBUTING.md for the checklist).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedlora.registry import Registry

FACTORS = frozenset({"lora_A", "lora_B"})


@dataclass(frozen=True)
class Variant:
    """One local update rule.

    Parameters
    ----------
    name : str
        Registry key, also the Hydra option ``adapter=<name>``.
    summary : str
        One line for the README and ``--help`` text.
    factors_for_round : Callable[[int], frozenset[str]]
        Server round (1-based) -> LoRA factors trained and sent that round,
        a subset of ``{"lora_A", "lora_B"}``.
    """

    name: str
    summary: str
    factors_for_round: Callable[[int], frozenset[str]]


VARIANTS: Registry[Variant] = Registry("adapter variant")


def register_variant(
    *, name: str, summary: str, factors_for_round: Callable[[int], frozenset[str]]
) -> Variant:
    """Register a variant; rejects duplicate or non-lower_snake_case names."""
    return VARIANTS.register(name, Variant(name, summary, factors_for_round))


def _both_factors(server_round: int) -> frozenset[str]:
    del server_round  # plain LoRA trains A and B every round
    return FACTORS


register_variant(
    name="lora",
    summary="Plain LoRA: A and B trained every step, both sent and averaged.",
    factors_for_round=_both_factors,
)
