"""Hand-built adapter states and train replies for the rank-aware strategy tests.

Shared by the HetLoRA, FlexLoRA / FLoRA and SHE-LoRA tests: random LoRA states at
a given rank and the reply a SHE-LoRA ClientApp would send (through the real
``sealed_reply``); ``train_reply`` and ``train_metrics`` come from ``replies``.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from replies import train_metrics, train_reply
from torch import Tensor

from fedlora.client.she import sealed_reply
from fedlora.config import AdapterConfig, ClientConfig
from fedlora.lora.state import A_SUFFIX, B_SUFFIX
from strategies.she_lora import SheLora

HEAD = "h.classifier.weight"


def lora_state(
    rank: int,
    *,
    shape: tuple[int, int],
    seed: int,
    matrices: tuple[str, ...] = ("x",),
    head_rows: int = 3,
    zero_b: bool = False,
) -> dict[str, Tensor]:
    """Random ``A: (rank, n)``, ``B: (m, rank)`` per matrix and a head ``(rows, m)``.

    ``zero_b`` gives a freshly initialised global adapter (B = 0).
    """
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    state = {HEAD: torch.randn(head_rows, m, generator=g)}
    for name in matrices:
        state[name + A_SUFFIX] = torch.randn(rank, n, generator=g)
        state[name + B_SUFFIX] = (
            torch.zeros(m, rank) if zero_b else torch.randn(m, rank, generator=g)
        )
    return state


def she_reply(
    strategy: SheLora,
    node: int,
    ctx: Any,
    trained: dict[str, Tensor],
    *,
    rank: int,
    alpha: float,
    size: int,
) -> tuple[Message, RecordDict]:
    """What a SHE-LoRA ClientApp sends back for ``trained`` and what it received."""
    content = strategy.node_content(1, node, ConfigRecord({"server-round": 1}))
    cfg = ClientConfig(adapter=AdapterConfig(rank=rank, alpha=alpha))
    plain, records, extra = sealed_reply(
        trained, content.config_records["config"], cfg, ctx, size
    )
    reply = RecordDict(
        {"arrays": ArrayRecord(plain), "metrics": train_metrics(size, **extra)}
    )
    for key, rec in records.items():
        reply[key] = rec
    return train_reply(node, reply), content
