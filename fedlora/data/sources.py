"""The data-source registry and the normalised row schemas shared by every source.

A source turns a :class:`~fedlora.config.DataConfig` (and the run seed) into the *full*
example set in one of two schemas:

- classification: ``{"text": str, "label": int}`` with labels in ``[0, num_classes)``;
- causal_lm: ``{"prompt": str, "completion": str}``; the loss covers the completion.
  With ``data.prompt_format=alpaca`` the prompt is text (instruction rows become an
  Alpaca prompt); with ``chat`` it is the JSON list of the messages before the
  response (``[{"role": "user", "content": ...}]``), which tokenization renders
  through the model's chat template.

Splitting (held-out, partitions) and tokenization are source independent and live in
:mod:`fedlora.data.split` and :mod:`fedlora.data.tokenize`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedlora.data.rows import Rows
from fedlora.registry import Registry

if TYPE_CHECKING:
    import datasets

    from fedlora.config import DataConfig

CLASSIFICATION_COLUMNS = ("text", "label")
CAUSAL_COLUMNS = ("prompt", "completion")
SCHEMAS = {"classification": CLASSIFICATION_COLUMNS, "causal_lm": CAUSAL_COLUMNS}
# The tasks (``data.task``): one row schema each.
TASKS = tuple(SCHEMAS)
# data.prompt_format: auto resolves to chat for chat presets, else alpaca.
PROMPT_FORMATS = ("auto", "alpaca", "chat")
CHAT_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class DataSource:
    """How one ``data.source`` value produces its normalised examples.

    Parameters
    ----------
    load : Callable[[DataConfig, int], Rows]
        ``load(cfg, seed)`` returns every example of the source in the schema of
        ``cfg.task`` (see the module docstring). Must be deterministic in its inputs.
        A ``datasets.Dataset`` is accepted too and copied into :class:`Rows`.
    tasks : tuple[str, ...]
        The ``data.task`` values the source can produce.
    """

    load: Callable[[DataConfig, int], Rows | datasets.Dataset]
    tasks: tuple[str, ...]


DATA_SOURCES: Registry[DataSource] = Registry("data source")


def column(ds: Rows | datasets.Dataset, name: str) -> list[Any]:
    """All values of one column as a list, read in one batch.

    For a ``datasets.Dataset`` (the Dirichlet partitioner's), ``list(ds[name])``
    would iterate row by row (datasets 4 returns a lazy column), which is ~10x
    slower on tens of thousands of rows.
    """
    if isinstance(ds, Rows):
        return ds.column(name)
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


def instruction_prompt(instruction: str, input_text: str, prompt_format: str) -> str:
    """Write an instruction row's prompt in the resolved ``data.prompt_format``.

    ``alpaca``: :func:`alpaca_prompt`. ``chat``: one user message holding the
    instruction and, after a blank line, the input (the chat template supplies the
    turn structure the Alpaca headers would).
    """
    if prompt_format == "chat":
        content = f"{instruction}\n\n{input_text}" if input_text else instruction
        return chat_prompt([{"role": "user", "content": content}])
    return alpaca_prompt(instruction, input_text)


def plain_prompt(prompt: str, prompt_format: str) -> str:
    """Write a ``prompt,completion`` row's prompt: as is, or one user message (chat).

    An empty prompt stays empty in both formats (plain text to continue).
    """
    if prompt_format == "chat" and prompt:
        return chat_prompt([{"role": "user", "content": prompt}])
    return prompt


def chat_prompt(messages: Sequence[dict[str, str]]) -> str:
    """Serialise the messages before the response (the ``chat`` prompt)."""
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages])


def parse_chat_prompt(prompt: str) -> list[dict[str, str]]:
    """Inverse of :func:`chat_prompt`; ``""`` is no messages."""
    return json.loads(prompt) if prompt else []


def split_conversation(value: Any, where: str) -> tuple[str, str]:
    """Split a ``messages`` row into ``(chat prompt, completion)``.

    The last message must be the assistant's (the response trained on); the ones
    before it are the prompt. Each message is ``{"role", "content"}`` with a role in
    :data:`CHAT_ROLES`.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: messages is not a JSON list ({e})") from None
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ValueError(f"{where}: messages must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not {"role", "content"} <= set(m):
            raise ValueError(f"{where}: message {i} needs keys role and content")
        if m["role"] not in CHAT_ROLES:
            raise ValueError(
                f"{where}: message {i} has role {m['role']!r}; allowed: {CHAT_ROLES}"
            )
        messages.append({"role": str(m["role"]), "content": str(m["content"])})
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: the last message is {messages[-1]['role']!r}; it must be the "
            "assistant's response to train on"
        )
    return chat_prompt(messages[:-1]), messages[-1]["content"]
