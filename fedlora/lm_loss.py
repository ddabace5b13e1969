"""Causal-LM loss without materialising the logits of a whole batch.

``model(**batch).loss`` computes logits of shape ``(B, L, V)`` in float32, then a
log-softmax of the same size, and keeps both for the backward pass: with the
tiny Llama's 30,522-token vocabulary a training batch of 8 x 128 tokens holds
~0.5 GB for the loss alone, and the server's evaluation batch of 64 x 128 ~2 GB;
a 128k-vocabulary model multiplies that by four. Here the decoder stack runs as
usual, then only the labelled positions (prompt and padding are dropped) go
through the LM head, a chunk of tokens at a time: ``LOGITS_BUDGET`` bytes of
logits at most. In training each chunk is checkpointed, so its logits are
recomputed in the backward pass instead of stored. The loss is the model's own:
the mean next-token cross-entropy over labelled positions (a test compares loss
and gradients with ``model(**batch).loss``).

Used for the model types whose logits are exactly ``lm_head(hidden)``
(:data:`PLAIN_HEAD_TYPES`); any other model, or a batch without labels, uses
the model's own loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

LOGITS_BUDGET = 32 * 2**20  # bytes of float32 logits per chunk
# logits = lm_head(last hidden state), no soft-capping or scaling in between, and
# no term besides the cross-entropy (MoE models add a router loss: not here)
PLAIN_HEAD_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "smollm3"}
)
IGNORE = -100


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """Return ``(decoder stack, LM head)`` of a (PEFT-wrapped) causal LM, or None.

    LoRA layers live inside these modules, so calling them runs the adapters.
    """
    get_base = getattr(model, "get_base_model", None)
    inner: Any = get_base() if callable(get_base) else model
    config = getattr(inner, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head: nn.Module | None = inner.get_output_embeddings()
    stack: nn.Module | None = getattr(inner, "base_model", None)
    if head is None or stack is None or stack is inner:
        return None
    return stack, head


def _chunk_ce(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """Sum of cross-entropy of ``head(hidden)`` ``(N, V)`` against ``labels (N,)``."""
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def head_loss_sum(
    head: nn.Module, hidden: Tensor, labels: Tensor, budget: int | None = None
) -> tuple[Tensor, int]:
    """Return the summed next-token cross-entropy and the labelled positions.

    ``hidden``: ``(B, L, H)`` last hidden states; ``labels``: ``(B, L)`` token ids
    with ``IGNORE`` where no loss is taken (position t predicts label t + 1).
    ``budget``: bytes of logits per chunk (default ``LOGITS_BUDGET``).
    """
    width = hidden.shape[-1]
    h = hidden[:, :-1].reshape(-1, width)
    y = labels[:, 1:].reshape(-1).to(hidden.device)
    keep = (y != IGNORE).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)
    weight: Tensor = getattr(head, "weight")  # noqa: B009 - (V, H) for any head
    vocab = int(getattr(head, "out_features", 0) or weight.shape[0])
    per_chunk = max(1, (LOGITS_BUDGET if budget is None else budget) // (4 * vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), per_chunk):
        hc, yc = h[i : i + per_chunk], y[i : i + per_chunk]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False)
        else:
            part = _chunk_ce(head, hc, yc)
        total = total + part
    return total, int(y.numel())


def lm_loss_sum(
    model: nn.Module, batch: Mapping[str, Tensor]
) -> tuple[Tensor, int] | None:
    """Return ``(summed loss, labelled positions)`` of a causal-LM batch, or None.

    None: the model is not a plain-head causal LM (:func:`split_model`) or the
    batch has no ``labels``; the caller then uses the model's own loss.
    """
    parts = split_model(model)
    if parts is None or "labels" not in batch:
        return None
    stack, head = parts
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    hidden = stack(**inputs).last_hidden_state
    return head_loss_sum(head, hidden, batch["labels"])


def lm_loss(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor | None:
    """Return the mean next-token loss ``model(**batch).loss`` gives, or None."""
    got = lm_loss_sum(model, batch)
    if got is None:
        return None
    total, count = got
    return total / max(count, 1)
