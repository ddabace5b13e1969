"""Where benchmark results go: JSON on stdout and in benchmarks/results/."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, stamp: str, out: dict[str, Any], path: Path | None) -> Path:
    """Print ``out`` as JSON and write it to ``path`` or results/<name>-<stamp>.json."""
    text = json.dumps(out, indent=2)
    target = path or RESULTS / f"{name}-{stamp}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text + "\n")
    print(text)
    print(f"[{name}] wrote {target}", file=sys.stderr)
    return target
