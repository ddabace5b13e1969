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


def _cell(fmt: str, value: Any, width: int) -> str:
    if value is None:
        return "-".rjust(width)
    return fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown-compatible table; columns with no value in any row are left out."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    widths = [max(len(title), len(fmt.format(0) if "," not in fmt else "0")) for _, title, fmt in cols]
    widths = [max(w, len(t)) for w, (_, t, _) in zip(widths, cols, strict=True)]
    lines = ["| " + " | ".join(t.rjust(w) for (_, t, _), w in zip(cols, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in rows:
        cells = [
            _cell(fmt, row.get(key), w).rjust(w)
            for (key, _, fmt), w in zip(cols, widths, strict=True)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
