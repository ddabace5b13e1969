"""Compare the jobs of a sweep: a Markdown + CSV table and a plot.

Usage::

    python -m simulations.report multirun/2026-11-25/12-00-00
    python -m simulations.report <sweep dir> --out <dir>   # default: the sweep dir

Jobs are the folders holding ``summary.json``. Jobs that differ only by ``seed``
form one setting; the table gives mean ± std of the final metrics over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = ("eval_accuracy", "eval_perplexity", "eval_loss", "epsilon")


@dataclass(frozen=True)
class Job:
    """One finished run of a sweep."""

    setting: str  # path relative to the sweep dir, seed folder removed
    seed: int
    final: dict[str, Any]
    rows: list[dict[str, Any]]
    bytes_total: int


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every finished job under ``sweep_dir`` (a folder with summary.json)."""
    jobs = []
    for summary_path in sorted(sweep_dir.rglob("summary.json")):
        job_dir = summary_path.parent
        summary = json.loads(summary_path.read_text())
        rel = job_dir.relative_to(sweep_dir)
        parts = [p for p in rel.parts if not p.startswith("seed=")]
        metrics = job_dir / "metrics.jsonl"
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        totals = summary.get("totals", {})
        jobs.append(
            Job(
                setting="/".join(parts) or "(defaults)",
                seed=int(summary.get("seed", 0)),
                final=summary.get("final", {}),
                rows=rows,
                bytes_total=int(totals.get("bytes_up", 0))
                + int(totals.get("bytes_down", 0)),
            )
        )
    return jobs


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarize(jobs: Sequence[Job]) -> list[dict[str, Any]]:
    """One row per setting: seeds, and mean/std of each final metric present."""
    groups: dict[str, list[Job]] = defaultdict(list)
    for job in jobs:
        groups[job.setting].append(job)
    table = []
    for setting, members in sorted(groups.items()):
        row: dict[str, Any] = {
            "setting": setting,
            "seeds": ",".join(
                str(j.seed) for j in sorted(members, key=lambda j: j.seed)
            ),
            "runs": len(members),
        }
        for key in METRICS:
            values = [
                float(j.final[key]) for j in members if j.final.get(key) is not None
            ]
            if values:
                row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(values)
        row["mbytes_mean"] = statistics.fmean(j.bytes_total for j in members) / 1e6
        table.append(row)
    return table


def to_markdown(table: Sequence[dict[str, Any]]) -> str:
    """Markdown table with mean ± std cells."""
    metrics = [m for m in METRICS if any(f"{m}_mean" in r for r in table)]
    head = ["setting", "runs", *[m.replace("_", " ") for m in metrics], "MB sent"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [r["setting"], str(r["runs"])]
        for m in metrics:
            cells.append(
                f"{r[f'{m}_mean']:.4f} ± {r[f'{m}_std']:.4f}"
                if f"{m}_mean" in r
                else "-"
            )
        cells.append(f"{r['mbytes_mean']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _overrides(setting: str) -> list[str]:
    """Split Hydra's ``override_dirname`` into its overrides.

    Only commas outside brackets separate: ``a=1,b=[2,4]`` -> ``a=1``, ``b=[2,4]``.
    """
    items, depth, current = [], 0, ""
    for char in setting:
        depth += {"[": 1, "(": 1, "{": 1, "]": -1, ")": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [*items, current] if current else items


def split_settings(settings: Sequence[str]) -> tuple[list[str], list[str]]:
    """Return the overrides all jobs share, and per job the ones that differ.

    A sweep's folders repeat every override; a legend needs only the differences.
    """
    parts = [_overrides(s) for s in settings]
    common = [o for o in parts[0] if all(o in p for p in parts[1:])] if parts else []
    return common, [", ".join(o for o in p if o not in common) for p in parts]


def plot(jobs: Sequence[Job], path: Path) -> None:
    """Held-out metric per round, one line per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = (
        "eval_accuracy"
        if any(j.final.get("eval_accuracy") is not None for j in jobs)
        else "eval_perplexity"
    )
    fig, ax = plt.subplots(figsize=(7, 4))
    common, labels = split_settings([job.setting for job in jobs])
    for job, label in zip(jobs, labels, strict=True):
        xs = [r["round"] for r in job.rows if r.get(key) is not None]
        ys = [r[key] for r in job.rows if r.get(key) is not None]
        ax.plot(xs, ys, marker="o", label=f"{label} seed={job.seed}".strip())
    ax.set_xlabel("round")
    ax.set_ylabel(key.replace("_", " "))
    if common:  # what every job shares, once, above the plot
        ax.set_title(textwrap.fill(", ".join(common), 110), fontsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Write report.md, report.csv and report.png; returns their paths."""
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"No finished jobs (summary.json) under {sweep_dir}")
    out = out_dir or sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    table = summarize(jobs)
    paths = {
        "md": out / "report.md",
        "csv": out / "report.csv",
        "png": out / "report.png",
    }
    paths["md"].write_text(to_markdown(table) + "\n")
    fields = sorted({k for r in table for k in r}, key=lambda k: (k != "setting", k))
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    plot(jobs, paths["png"])
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    paths = write_report(args.sweep_dir, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
