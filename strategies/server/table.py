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
    ("epsilon", "epsilon", "{:>7.3f}"),
    ("clients", "clients", "{:>7}"),
    ("bytes_up", "bytes up", "{:>10,}"),
    ("bytes_down", "bytes down", "{:>10,}"),
    ("seconds", "seconds", "{:>7.1f}"),
)


def _cell(fmt: str, value: Any) -> str:
    return "-" if value is None else fmt.format(value).strip()


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown-compatible table; columns with no value in any row are left out."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    cells = [[_cell(fmt, r.get(key)) for key, _, fmt in cols] for r in rows]
    widths = [
        max([len(title), *(len(row[i]) for row in cells)])
        for i, (_, title, _) in enumerate(cols)
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
