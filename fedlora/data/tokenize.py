"""Tokenized examples and the batch collator, for both tasks.

Classification: ``tokenizer(text, truncation=True, max_length=L)`` with the
tokenizer's own special tokens; the label is a 0-d tensor.

Causal LM: ``ids = [bos] + tok(prompt) + tok(completion) + [eos]`` cut to the first
``L`` tokens, and ``labels`` equal to ``ids`` except ``-100`` on the bos and prompt
positions, so the loss covers the completion and the end token only. ``labels`` are
not shifted: Hugging Face causal LMs (and ``fedlora.train``) shift them by one.
Tokenizers without bos/eos (BERT WordPiece) use ``[CLS]``/``[SEP]`` instead. With
``data.prompt_format=chat`` the prompt is rendered by the tokenizer's chat template
(which writes its own start tokens, so no bos is added) and ``eos`` (for chat models
the end-of-turn token) closes the response.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from fedlora.data.rows import Rows
from fedlora.data.sources import SCHEMAS, column, parse_chat_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fedlora.config import DataConfig

IGNORE_INDEX = -100  # cross-entropy skips these label positions


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int]:
    """``(start, end)`` token ids: bos/eos, else cls/sep; start may be absent."""
    start = tokenizer.bos_token_id
    if start is None:
        start = tokenizer.cls_token_id
    end = tokenizer.eos_token_id
    if end is None:
        end = tokenizer.sep_token_id
    if end is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has neither eos nor sep token; a "
            "causal LM needs an end-of-sequence token to learn when to stop"
        )
    return start, end


def causal_example(
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    *,
    start: int | None,
    end: int,
    max_length: int,
) -> tuple[list[int], list[int]]:
    """Join prompt and completion into ``(input_ids, labels)``, both of length <= L.

    Parameters
    ----------
    prompt_ids, completion_ids : Sequence[int]
        Token ids without special tokens.
    start : int or None
        Start token put first (None: no start token).
    end : int
        End token appended after the completion.
    max_length : int
        L, the number of tokens kept from the start.

    Returns
    -------
    tuple[list[int], list[int]]
        ``input_ids`` and ``labels``: the same ids with ``-100`` on start+prompt.
    """
    head = ([start] if start is not None else []) + list(prompt_ids)
    tail = list(completion_ids) + [end]
    ids = head + tail
    labels = [IGNORE_INDEX] * len(head) + tail
    return ids[:max_length], labels[:max_length]


class TokenizedDataset(Dataset[dict[str, Tensor]]):
    """Normalised rows tokenized once, served as tensors.

    Parameters
    ----------
    ds : Rows
        Rows in the schema of ``cfg.task`` (``text,label`` or ``prompt,completion``).
    tokenizer : PreTrainedTokenizerBase
        Tokenizer of the model being tuned (a fast one tokenizes in batch).
    cfg : DataConfig
        ``task`` and ``max_length`` (tokens kept per example).

    Notes
    -----
    Item ``i`` is ``{"input_ids": (T,), "attention_mask": (T,), "labels": ...}`` with
    ``T <= max_length`` and LongTensor values; ``labels`` is 0-d (classification) or
    ``(T,)`` with ``-100`` on prompt positions (causal_lm).
    """

    def __init__(
        self, ds: Rows, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
    ) -> None:
        expected = list(SCHEMAS[cfg.task])
        if not set(expected) <= set(ds.column_names):
            raise ValueError(
                f"data.task={cfg.task!r} needs rows with columns {expected}; the "
                f"dataset has {ds.column_names}"
            )
        if ds.num_rows == 0:  # e.g. the held-out split with data.test_fraction=0
            self._items: list[dict[str, Tensor]] = []
        elif cfg.task == "classification":
            self._items = _encode_classification(ds, tokenizer, cfg.max_length)
        else:
            chat = cfg.prompt_format == "chat"
            self._items = _encode_causal(ds, tokenizer, cfg.max_length, chat=chat)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return dict(self._items[index])  # a copy: callers may add or pop keys


def _long(values: Sequence[int] | int) -> Tensor:
    return torch.tensor(values, dtype=torch.long)


def _encode_classification(
    ds: Rows, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict[str, Tensor]]:
    enc = tokenizer(column(ds, "text"), truncation=True, max_length=max_length)
    return [
        {"input_ids": _long(ids), "attention_mask": _long(mask), "labels": _long(y)}
        for ids, mask, y in zip(
            enc["input_ids"], enc["attention_mask"], column(ds, "label"), strict=True
        )
    ]


def chat_prompt_ids(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int
) -> list[list[int]]:
    """Token ids of chat prompts (JSON message lists) through the chat template.

    Each ends with the template's assistant header (``add_generation_prompt``), so
    the completion tokens follow as the assistant's turn; the template writes its own
    start tokens. An empty prompt (no messages) is no tokens. Cut to ``max_length``.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"data.prompt_format=chat but the tokenizer ({type(tokenizer).__name__}) "
            "has no chat template; use data.prompt_format=alpaca or a chat model"
        )
    out: list[list[int]] = []
    for prompt in prompts:
        messages = parse_chat_prompt(prompt)
        if not messages:
            out.append([])
            continue
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        out.append(list(ids)[:max_length])
    return out


def _encode_causal(
    ds: Rows,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    chat: bool = False,
) -> list[dict[str, Tensor]]:
    start, end = special_ids(tokenizer)
    # Each part is cut to L already: the join keeps the first L tokens anyway, and
    # this avoids "sequence longer than the model maximum" warnings on long texts.
    kwargs = {"add_special_tokens": False, "truncation": True, "max_length": max_length}
    if chat:  # the template writes the start tokens; eos ends the assistant turn
        prompts = chat_prompt_ids(tokenizer, column(ds, "prompt"), max_length)
        start = None
    else:
        prompts = tokenizer(column(ds, "prompt"), **kwargs)["input_ids"]
    completions = tokenizer(column(ds, "completion"), **kwargs)["input_ids"]
    items = []
    dropped = 0
    for p, c in zip(prompts, completions, strict=True):
        ids, labels = causal_example(p, c, start=start, end=end, max_length=max_length)
        # A prompt that fills max_length leaves no target token: the mean loss of a
        # batch made only of such rows is 0/0, so these rows are left out.
        if all(y == IGNORE_INDEX for y in labels[1:]):
            dropped += 1
            continue
        items.append(
            {
                "input_ids": _long(ids),
                "attention_mask": _long([1] * len(ids)),
                "labels": _long(labels),
            }
        )
    if dropped:
        warnings.warn(
            f"{dropped} of {len(prompts)} examples have no response token within "
            f"data.max_length={max_length} and are skipped; raise data.max_length",
            stacklevel=3,
        )
    return items


@dataclass(frozen=True)
class Collator:
    """Right-pad a list of items into a batch (picklable, for DataLoader workers).

    Parameters
    ----------
    pad_id : int
        Id written into padded ``input_ids`` positions (masked out anyway).
    task : str
        ``classification`` (labels ``(B,)``) or ``causal_lm`` (labels ``(B, T)``
        padded with ``-100``).
    """

    pad_id: int
    task: str

    def __call__(self, items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Batch ``items``; an empty list gives ``(0, 1)`` inputs (DP Poisson batches).

        Returns
        -------
        dict[str, Tensor]
            ``input_ids``, ``attention_mask``: ``(B, T)`` with T the longest item;
            ``labels``: ``(B,)`` or ``(B, T)``.
        """
        if not items:
            empty = torch.zeros((0, 1), dtype=torch.long)
            labels = (
                torch.zeros((0,), dtype=torch.long)
                if self.task == "classification"
                else torch.full((0, 1), IGNORE_INDEX, dtype=torch.long)
            )
            return {
                "input_ids": empty,
                "attention_mask": empty.clone(),
                "labels": labels,
            }
        batch = {
            "input_ids": _pad([x["input_ids"] for x in items], self.pad_id),
            "attention_mask": _pad([x["attention_mask"] for x in items], 0),
        }
        if self.task == "classification":
            batch["labels"] = torch.stack([x["labels"] for x in items])  # (B,)
        else:
            batch["labels"] = _pad([x["labels"] for x in items], IGNORE_INDEX)
        return batch


def _pad(rows: list[Tensor], value: int) -> Tensor:
    """Right-pad 1-D tensors to the longest: (B, T)."""
    return pad_sequence(rows, batch_first=True, padding_value=value)


def make_collator(tokenizer: PreTrainedTokenizerBase, task: str) -> Collator:
    """Collator for ``task`` padding with the tokenizer's pad id (else its end id).

    Parameters
    ----------
    tokenizer : PreTrainedTokenizerBase
        Source of the pad id.
    task : str
        ``classification`` or ``causal_lm``.
    """
    if task not in SCHEMAS:
        raise ValueError(f"task={task!r} is not one of {sorted(SCHEMAS)}")
    pad = tokenizer.pad_token_id
    if pad is None:  # e.g. Llama/GPT-2: the value is masked out, any id works
        pad = special_ids(tokenizer)[1]
    return Collator(pad_id=int(pad), task=task)
