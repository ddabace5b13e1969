"""Generation-based evaluation: greedy answers, exact match and ROUGE-L, through
the server's held-out evaluator and a client's evaluate reply."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from tiny_configs import tiny_config

from fedlora import protocol as proto
from fedlora.cache import heldout_dataset, model_bundle
from fedlora.client.app import app as client_app
from fedlora.client.round import evaluate_round
from fedlora.client.site import SiteConfig
from fedlora.config.flat import flatten_config
from fedlora.fingerprint import base_fingerprint
from fedlora.generation import (
    exact_match,
    greedy_generate,
    normalise_answer,
    rouge_l,
    split_item,
)
from fedlora.lora.state import adapter_state, to_record
from fedlora.models import load_tokenizer
from strategies.server.evaluator import CentralEvaluator

GEN = {"train.eval_generate": 6, "train.max_new_tokens": 5, "train.eval_batch_size": 4}
CFG = tiny_config("causal_lm", {"data.num_examples": 200, **GEN})


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (textbook dynamic programme)."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def _rouge_l_reference(prediction: str, reference: str) -> float:
    p, r = prediction.lower().split(), reference.lower().split()
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_is_the_lcs_f_measure_and_exact_match_ignores_case_and_spacing() -> (
    None
):
    predictions = ["the cat sat on the mat", "Positive", "a b c d", "x y", ""]
    references = ["the cat lay on a mat", " positive ", "d c b a", "x y", "z"]
    expected = [
        _rouge_l_reference(p, r) for p, r in zip(predictions, references, strict=True)
    ]
    assert rouge_l(predictions, references) == pytest.approx(sum(expected) / 5)
    assert expected[0] == pytest.approx(2 * (4 / 6) * (4 / 6) / (8 / 6))
    assert exact_match(predictions, references) == pytest.approx(2 / 5)
    assert normalise_answer("  Paris\n is  Big ") == "paris is big"
    with pytest.raises(ValueError, match="2 predictions, 1 references"):
        exact_match(["a", "b"], ["a"])


def test_an_item_splits_into_its_prompt_and_its_labelled_response() -> None:
    data = heldout_dataset(CFG)
    item = data[0]
    prompt, reference = split_item(item)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids == prompt + reference  # the labels are the ids after the prompt
    assert all(y == -100 for y in labels[: len(prompt)]) and labels[len(prompt)] != -100


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time() -> None:
    model = model_bundle(CFG).model
    tok = load_tokenizer(CFG.model)
    data = heldout_dataset(CFG)
    prompts = [split_item(data[i])[0] for i in range(5)]
    assert len({len(p) for p in prompts}) > 1  # unequal lengths: padding matters
    kwargs: dict[str, Any] = {
        "pad_id": tok.pad_token_id, "eos_id": tok.sep_token_id, "max_new_tokens": 6,
        "device": torch.device("cpu"),
    }  # fmt: skip
    batched = greedy_generate(model, prompts, batch_size=5, **kwargs)
    alone = [greedy_generate(model, [p], batch_size=1, **kwargs)[0] for p in prompts]
    assert batched == alone
    assert all(0 < len(a) <= 6 and tok.sep_token_id not in a for a in batched)


def test_server_and_client_evaluation_report_generation_scores() -> None:
    evaluator = CentralEvaluator(CFG)
    fields = evaluator.fields(evaluator.initial_state())
    assert 0 <= fields["eval_exact_match"] <= 1 and 0 <= fields["eval_rouge_l"] <= 1
    assert fields["eval_perplexity"] is not None
    off = CentralEvaluator(tiny_config("causal_lm", {"data.num_examples": 200}))
    assert off.fields(off.initial_state())["eval_rouge_l"] is None
    result = evaluate_round(CFG, SiteConfig(0, 2), evaluator.initial_state())
    assert result.exact_match is not None and result.rouge_l is not None


@pytest.mark.usefixtures("flower_task_identity")
def test_a_client_evaluate_reply_carries_exact_match_and_rouge_l() -> None:
    model = model_bundle(CFG).model
    msg = Message(
        RecordDict({
            proto.ARRAYS: to_record(adapter_state(model)),
            proto.CONFIG: ConfigRecord({
                proto.SERVER_ROUND: 1, proto.BASE_FINGERPRINT: base_fingerprint(model)
            }),
        }),
        dst_node_id=7,
        message_type="evaluate",
    )  # fmt: skip
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(), run_config=flatten_config(CFG),
    )  # fmt: skip
    metrics = client_app(msg, context).content.metric_records[proto.METRICS]
    assert 0 <= float(metrics[proto.EVAL_EXACT_MATCH]) <= 1  # type: ignore[arg-type]
    assert 0 <= float(metrics[proto.EVAL_ROUGE_L]) <= 1  # type: ignore[arg-type]
