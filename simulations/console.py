"""What a person sees on the console during a run; everything else goes to the logs.

A simulation streams hundreds of lines: Flower's notices, one set of library
warnings per Ray actor (FutureWarnings, "MISSING params" load reports, kernel
notices), progress bars. All of it is kept verbatim in the run directory
(``flwr.log``, ``flwr/superlink.log``); the console shows only:

* the start line (where the run directory is);
* the round table, one row per round as it finishes;
* warnings that matter to the user: our own (``fedlora:`` prefix: a dropped reply,
  a round below the minimum, a client whose privacy budget is spent, a node left
  out) and errors;
* the final summary (written by the launcher).

``launcher.verbose=true`` prints every line instead.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Flower's logger prefix: "INFO :      ", "WARNING :   ", "ERROR :     ".
_LEVEL = re.compile(
    r"^(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:\s*(?P<text>.*)$"
)
_TABLE_ROW = re.compile(r"^\|[\s\-:|\w.,]*\|$")


def plain(line: str) -> str:
    """Strip ANSI colour codes and trailing whitespace."""
    return _ANSI.sub("", line).rstrip()


def keep(line: str) -> str | None:
    """Return the text to show for one streamed line, or None (logs only)."""
    text = plain(line)
    if text.startswith("[fedlora] WARNING"):
        return text
    match = _LEVEL.match(text)
    if match is None:
        return None  # actor output, tracebacks, progress bars, multi-line tails
    level, body = match.group("level"), match.group("text").strip()
    if _TABLE_ROW.match(body):
        return body
    if body.startswith("fedlora: writing the run directory"):
        return body
    if body.startswith("fedlora:") and level in ("WARNING", "ERROR", "CRITICAL"):
        return f"{level}: {body.removeprefix('fedlora: ')}"
    if level in ("ERROR", "CRITICAL"):
        return f"{level}: {body}"
    return None


def summary_line(rows: Sequence[Mapping[str, Any]], run_dir: str) -> str:
    """One closing line: rounds, wall time, the final held-out metrics, outputs."""
    if not rows:
        return f"fedlora: no round finished; logs in {run_dir}/flwr.log"
    last = rows[-1]
    seconds = sum(float(r.get("seconds") or 0.0) for r in rows)
    parts = []
    for key, name, fmt in (
        ("eval_accuracy", "held-out accuracy", "{:.4f}"),
        ("eval_perplexity", "perplexity", "{:.2f}"),
        ("eval_loss", "loss", "{:.4f}"),
        ("epsilon", "epsilon", "{:.3f}"),
    ):
        value = last.get(key)
        if value is not None and value == value:  # skip missing and NaN
            parts.append(f"{name} {fmt.format(value)}")
    result = ", ".join(parts) or "no held-out evaluation"
    return (
        f"fedlora: {last.get('round', 0)} rounds in {seconds:.0f} s; {result}. "
        f"Outputs: {run_dir} (metrics.jsonl, summary.json, plots/, adapter/; full "
        "logs in flwr.log)"
    )


class Console:
    """A line sink for :class:`~simulations.flower_runtime.LocalSimulation`.

    Parameters
    ----------
    verbose : bool (default: False)
        Print every line as streamed (the logs get every line either way).
    out : TextIO (default: sys.stdout)
        Where the kept lines go.
    """

    def __init__(self, verbose: bool = False, out: TextIO | None = None) -> None:
        self.verbose = verbose
        self.out = out or sys.stdout
        self.shown = 0

    def __call__(self, line: str) -> None:
        """Show ``line`` (or what :func:`keep` keeps of it)."""
        text = line if self.verbose else keep(line)
        if text is not None:
            self.write(text)

    def write(self, text: str) -> None:
        """Print a line of our own (start, summary)."""
        print(text, file=self.out, flush=True)
        self.shown += 1
