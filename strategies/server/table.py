"""A readable per-round table of metrics.jsonl rows (console and README)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (
    ("round", "round", "{:>5}"),
    ("train_loss", "train loss", "{:>10.4f}"),
    ("eval_loss", "eval loss", "{:>9.4f}"),
    ("eval_accuracy", "eval acc", "{:>8.4f}"),
    ("eval_perplexity", "eval ppl", "{:>9.2f}"),
    ("eval_exact_match", "exact match", "{:>11.4f}"),
    ("eval_rouge_l", "rouge-L", "{:>7.4f}"),
    ("epsilon", "epsilon", "{:>7.3f}"),
    ("clients", "clients", "{:>7}"),
    ("bytes_up", "bytes up", "{:>10,}"),
    ("bytes_down", "bytes down", "{:>10,}"),
    ("seconds", "seconds", "{:>7.1f}"),
)
# Widths for a table printed one row at a time (rows must line up with the header
# printed before any value is known): room for 100 MB in the byte columns.
STREAM_WIDTHS = {"bytes_up": 11, "bytes_down": 11, "seconds": 7, "round": 5}


def run_columns(task: str, private: bool, generate: bool = False) -> list[str]:
    """Return the columns a run of ``task`` fills, in order.

    ``private`` adds epsilon; ``generate`` (causal LM) exact match and ROUGE-L.
    """
    metric = "eval_accuracy" if task == "classification" else "eval_perplexity"
    wanted = {"round", "train_loss", "eval_loss", metric, "clients", "bytes_up"}
    if generate and task == "causal_lm":
        wanted |= {"eval_exact_match", "eval_rouge_l"}
    wanted |= {"bytes_down", "seconds"} | ({"epsilon"} if private else set())
    return [key for key, _, _ in COLUMNS if key in wanted]


def _cell(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value).strip()


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None
) -> str:
    """Markdown-compatible table.

    Without ``columns``, the columns with a value in some row, each as wide as its
    content. With ``columns`` (e.g. :func:`run_columns`), exactly those, at fixed
    widths, so tables of one row each line up when printed one after another.
    """
    if columns is None:
        cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    else:
        cols = [c for c in COLUMNS if c[0] in columns]
    cells = [[_cell(fmt, r.get(key)) for key, _, fmt in cols] for r in rows]
    widths = [
        max(
            [
                len(title),
                STREAM_WIDTHS.get(key, 0) if columns is not None else 0,
                *(len(row[i]) for row in cells),
            ]
        )
        for i, (key, title, _) in enumerate(cols)
    ]
    lines = [
        "| "
        + " | ".join(t.rjust(w) for (_, t, _), w in zip(cols, widths, strict=True))
        + " |"
    ]
    lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in cells:
        lines.append(
            "| "
            + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
            + " |"
        )
    return "\n".join(lines)
