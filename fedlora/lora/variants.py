"""Local update rules (adapter variants) and their registry.

A variant decides which LoRA factors a client trains in a round and in each local
step, which tensors the server sends down and which come back. All schedules are
driven by indices the server and every client share (the server round, and the
1-based local step ``k`` of the round), never by a per-client counter, so every
client alternates in step.

* ``lora`` -- plain LoRA (FedIT): A and B every step, both sent, both averaged.
* ``ffa`` -- FFA-LoRA [Sun et al., ICLR 2024]: A frozen at its shared random init,
  only B trained and sent (both directions), so averaging B is exactly averaging
  the updates ``B_i A``.
* ``la_lora`` -- LA-LoRA [Liu et al., ICLR 2026]: A and B alternate per local step
  (B on the round's odd local steps, 1-based, as in the paper, so every round
  starts with B even when the number of local steps is odd) and the privatised
  gradient is low-pass filtered; both factors are sent and averaged.
* ``rolora`` -- RoLoRA [Chen et al., 2024]: alternation across rounds; odd rounds
  train the zero-initialised B, even rounds A; only the trained factor comes back.

See CONTRIBUTING.md for the checklist to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedlora.registry import Registry

FACTORS = frozenset({"lora_A", "lora_B"})
ONLY_A = frozenset({"lora_A"})
ONLY_B = frozenset({"lora_B"})

RoundRule = Callable[[int], frozenset[str]]


@dataclass(frozen=True)
class Variant:
    """One local update rule.

    Parameters
    ----------
    name : str
        Registry key, also the Hydra option ``adapter=<name>``.
    summary : str
        One line for the README.
    factors_for_round : Callable[[int], frozenset[str]]
        Server round (1-based) -> factors trained that round and sent back up.
    sends_down : Callable[[int], frozenset[str]]
        Server round -> factors the server sends to clients.
    factors_for_step : Callable[[int], frozenset[str]] | None
        Local step of the round (1-based) -> factors updated in that step; None
        means every factor of the round in every step.
    lowpass : bool
        Whether the LA-LoRA low-pass filter applies to the gradients.
    """

    name: str
    summary: str
    factors_for_round: RoundRule
    sends_down: RoundRule
    factors_for_step: RoundRule | None = None
    lowpass: bool = False


VARIANTS: Registry[Variant] = Registry("adapter variant")


def register_variant(
    *,
    name: str,
    summary: str,
    factors_for_round: RoundRule,
    sends_down: RoundRule,
    factors_for_step: RoundRule | None = None,
    lowpass: bool = False,
) -> Variant:
    """Register a variant; rejects duplicate or non-lower_snake_case names."""
    variant = Variant(
        name, summary, factors_for_round, sends_down, factors_for_step, lowpass
    )
    return VARIANTS.register(name, variant)


def both_factors(index: int) -> frozenset[str]:
    """Every factor, whatever the round or step."""
    del index
    return FACTORS


def only_b(index: int) -> frozenset[str]:
    """B only (FFA-LoRA: A stays at its shared initialisation)."""
    del index
    return ONLY_B


def b_on_odd(index: int) -> frozenset[str]:
    """B on odd indices (1-based), A on even ones: the zero-initialised B first.

    While B = 0 the gradient of A is 0, so training A first would waste the step
    (under DP it would be a pure-noise update of A); RoLoRA (rounds) and LA-LoRA
    (local steps of each round) both start with B.
    """
    return ONLY_B if index % 2 == 1 else ONLY_A


register_variant(
    name="lora",
    summary="Plain LoRA: A and B trained every step, both sent and averaged.",
    factors_for_round=both_factors,
    sends_down=both_factors,
)
register_variant(
    name="ffa",
    summary="FFA-LoRA: A frozen at the shared init, only B trained and sent.",
    factors_for_round=only_b,
    sends_down=only_b,
)
register_variant(
    name="la_lora",
    summary="LA-LoRA: A/B alternate per local step (B on odd), low-pass filtered.",
    factors_for_round=both_factors,
    sends_down=both_factors,
    factors_for_step=b_on_odd,
    lowpass=True,
)
register_variant(
    name="rolora",
    summary="RoLoRA: B in odd rounds, A in even rounds; only that factor is sent up.",
    factors_for_round=b_on_odd,
    sends_down=both_factors,
)
