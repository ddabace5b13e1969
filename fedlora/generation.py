"""Generation-based evaluation of a causal LM: greedy answers, exact match, ROUGE-L.

Greedy answers to held-out prompts are scored against the reference responses.

The prompts and references come from the tokenized held-out items themselves
(:class:`fedlora.data.TokenizedDataset`): the prompt is the prefix whose labels are
``-100`` (the chat template or Alpaca prompt, exactly as trained), the reference is
the labelled completion without its end token. Generation and scoring therefore
see the same text as the loss does.

* exact match: the answer equals the reference after stripping, collapsing runs of
  whitespace and case folding (for label-like answers such as "positive");
* ROUGE-L: the F-measure of the longest common subsequence of words, from Google's
  ``rouge-score`` package (the implementation behind most published ROUGE figures),
  averaged over examples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor, nn

from fedlora.data.tokenize import IGNORE_INDEX, special_ids

if TYPE_CHECKING:
    from torch.utils.data import Dataset
    from transformers import PreTrainedTokenizerBase

    from fedlora.config import ClientConfig
    from fedlora.train import EvalResult


class GenerationScores(NamedTuple):
    """Mean scores over the generated examples."""

    exact_match: float
    rouge_l: float
    num_examples: int


def split_item(item: dict[str, Tensor]) -> tuple[list[int], list[int]]:
    """``(prompt ids, reference ids)`` of a tokenized causal-LM item.

    ``item["labels"]`` is ``(T,)`` with ``-100`` on the prompt positions; the
    reference is every labelled token (the completion and its end token).
    """
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    cut = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(ids))
    return ids[:cut], [y for y in labels[cut:] if y != IGNORE_INDEX]


def normalise_answer(text: str) -> str:
    """Strip, collapse whitespace, case-fold: the form compared by exact match."""
    return " ".join(text.split()).casefold()


def _mean_over_pairs(
    predictions: Sequence[str],
    references: Sequence[str],
    score: Callable[[str, str], float],
) -> float:
    """Mean of ``score(prediction, reference)``; nan for no pairs."""
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions, {len(references)} references"
        )
    if not references:
        return float("nan")
    pairs = zip(predictions, references, strict=True)
    return sum(score(p, r) for p, r in pairs) / len(references)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference (see :func:`normalise_answer`)."""
    return _mean_over_pairs(
        predictions,
        references,
        lambda p, r: float(normalise_answer(p) == normalise_answer(r)),
    )


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge_score``, no stemming) over the pairs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _mean_over_pairs(
        predictions,
        references,
        lambda p, r: float(scorer.score(r, p)["rougeL"].fmeasure),
    )


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[list[int]]:
    """Greedy continuations of ``prompts``, batched with left padding.

    Returns the new token ids of each prompt, cut before the first ``eos_id``.
    Left padding keeps every prompt's last token at the same position, so one
    batched ``generate`` call continues all of them.
    """
    model.eval()
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, p in enumerate(chunk):
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        generated = model.generate(  # type: ignore[operator]
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for row in generated[:, width:].tolist():
            out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


def generation_scores(
    model: nn.Module,
    dataset: Dataset[dict[str, Tensor]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    examples: int,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> GenerationScores:
    """Greedy answers to the first ``examples`` held-out prompts, scored.

    Parameters
    ----------
    dataset : Dataset
        Tokenized causal-LM items (``labels`` ``-100`` on the prompt).
    examples : int
        How many items to answer (all when fewer); the same first items every
        round, so rounds are comparable.
    max_new_tokens : int
        Cap on each answer's length (answers stop earlier at eos).
    """
    n = min(examples, len(dataset))  # type: ignore[arg-type]
    pairs = [split_item(dataset[i]) for i in range(n)]
    pairs = [(p, r) for p, r in pairs if p]  # a prompt-less row has nothing to answer
    _, eos_id = special_ids(tokenizer)  # the end token training appended
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    answers = greedy_generate(
        model,
        [p for p, _ in pairs],
        pad_id=pad_id,
        eos_id=eos_id,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        device=device,
    )
    predictions = tokenizer.batch_decode(answers, skip_special_tokens=True)
    references = tokenizer.batch_decode([r for _, r in pairs], skip_special_tokens=True)
    return GenerationScores(
        exact_match(predictions, references),
        rouge_l(predictions, references),
        len(pairs),
    )


def with_generation(
    result: EvalResult,
    model: nn.Module,
    dataset: Dataset[dict[str, Tensor]],
    cfg: ClientConfig,
    device: torch.device,
) -> EvalResult:
    """Add exact match and ROUGE-L to ``result`` when ``train.eval_generate > 0``.

    The server's held-out evaluation and a client's federated evaluation both call
    this after :func:`fedlora.train.evaluate`, so both report the same measures.
    """
    if cfg.data.task != "causal_lm" or cfg.train.eval_generate == 0:
        return result
    from fedlora.models import load_tokenizer

    scores = generation_scores(
        model,
        dataset,
        load_tokenizer(cfg.model),
        examples=cfg.train.eval_generate,
        max_new_tokens=cfg.train.max_new_tokens,
        batch_size=cfg.train.eval_batch_size,
        device=device,
    )
    return result._replace(exact_match=scores.exact_match, rouge_l=scores.rouge_l)
