"""The chunked causal-LM loss equals the model's own, loss and gradients, on the
client model users train (tiny Llama, NF4, LoRA) with prompt-masked, padded rows
of unequal length, and evaluation reports the same loss as through full logits."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_configs import tiny_config
from torch import nn

from fedlora import lm_loss
from fedlora.cache import collator, model_bundle, partition_dataset
from fedlora.train import batch_loss, evaluate

CFG = tiny_config("causal_lm", {"federation.clients": 2, "adapter.lr_ratio_b": 1.0})


def _batch(rows: int = 6) -> dict[str, torch.Tensor]:
    data = partition_dataset(CFG, 0, 2)
    batch = collator(CFG)([data[i] for i in range(rows)])
    assert (batch["labels"] == lm_loss.IGNORE).any()  # prompts and padding masked
    assert (batch["attention_mask"] == 0).any()  # rows of unequal length
    return batch


def _lora_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None and "lora_" in n
    }


def test_the_chunked_loss_and_its_gradients_equal_the_model_s_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = model_bundle(CFG).model
    model.train()
    batch = _batch()
    for p in model.parameters():
        p.grad = None
    want = model(**batch).loss
    want.backward()
    want_grads = _lora_grads(model)
    assert want_grads
    for p in model.parameters():
        p.grad = None
    # a budget of 7 tokens' logits per chunk: many chunks, the last one short
    vocab = model.get_output_embeddings().weight.shape[0]
    monkeypatch.setattr(lm_loss, "LOGITS_BUDGET", 7 * 4 * vocab)
    got = batch_loss(model, batch, None)  # the training path
    got.backward()
    got_grads = _lora_grads(model)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-7)
    for p in model.parameters():
        p.grad = None


def test_evaluation_reports_the_loss_of_the_full_logits() -> None:
    model = model_bundle(CFG).model
    data = partition_dataset(CFG, 1, 2)
    got = evaluate(
        model, data, collator(CFG), task="causal_lm", batch_size=5,
        device=torch.device("cpu"),
    )  # fmt: skip
    total, units = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data), 5):
            rows = [data[i] for i in range(start, min(len(data), start + 5))]
            batch = collator(CFG)(rows)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            y = labels[:, 1:].reshape(-1)
            total += float(
                nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), y, reduction="sum"
                )
            )
            units += int((y != lm_loss.IGNORE).sum())
    assert got.loss == pytest.approx(total / units, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(total / units), rel=1e-5)


def test_only_plain_head_causal_lms_take_the_chunked_path() -> None:
    causal = model_bundle(CFG).model
    assert lm_loss.split_model(causal) is not None
    classifier = model_bundle(tiny_config("classification")).model
    assert lm_loss.split_model(classifier) is None  # a score head, not an LM head
    batch = _batch(2)
    del batch["labels"]
    assert lm_loss.lm_loss(causal, batch) is None  # nothing to score
