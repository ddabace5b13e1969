"""The data-source registry and the normalised row schemas shared by every source.

A source turns a :class:`~fedlora.config.DataConfig` (and the run seed) into the *full*
example set in one of two schemas:

- classification: ``{"text": str, "label": int}`` with labels in ``[0, num_classes)``;
- causal_lm: ``{"prompt": str, "completion": str}``; the loss covers the completion.

Splitting (held-out, partitions) and tokenization are source independent and live in
:mod:`fedlora.data.split` and :mod:`fedlora.data.tokenize`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora.registry import Registry

if TYPE_CHECKING:
    import datasets

    from fedlora.config import DataConfig

CLASSIFICATION_COLUMNS = ("text", "label")
CAUSAL_COLUMNS = ("prompt", "completion")
SCHEMAS = {"classification": CLASSIFICATION_COLUMNS, "causal_lm": CAUSAL_COLUMNS}
# The tasks (``data.task``): one row schema each.
TASKS = tuple(SCHEMAS)


@dataclass(frozen=True)
class DataSource:
    """How one ``data.source`` value produces its normalised examples.

    Parameters
    ----------
    load : Callable[[DataConfig, int], datasets.Dataset]
        ``load(cfg, seed)`` returns every example of the source in the schema of
        ``cfg.task`` (see the module docstring). Must be deterministic in its inputs.
    tasks : tuple[str, ...]
        The ``data.task`` values the source can produce.
    """

    load: Callable[[DataConfig, int], datasets.Dataset]
    tasks: tuple[str, ...]


DATA_SOURCES: Registry[DataSource] = Registry("data source")


def column(ds: datasets.Dataset, name: str) -> list[Any]:
    """All values of one column as a list, read in one batch.

    ``list(ds[name])`` would iterate row by row (datasets 4 returns a lazy column),
    which is ~10x slower on tens of thousands of rows.
    """
    return list(ds.select_columns([name]).to_dict()[name])


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    r"""Format an instruction (and optional input) as an Alpaca prompt.

    Parameters
    ----------
    instruction : str
        What the model is asked to do.
    input_text : str (default: "")
        Material the instruction refers to; the ``### Input:`` section is left out
        when it is empty.

    Returns
    -------
    str
        The prompt, ending with ``"### Response:\n"`` so the completion follows it.
    """
    if input_text:
        return (
            f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n"
            "### Response:\n"
        )
    return f"### Instruction:\n{instruction}\n\n### Response:\n"
