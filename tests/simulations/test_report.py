"""Sweep report: grouping by setting across seeds, mean ± std, files written."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from simulations.report import find_jobs, split_settings, summarize, write_report


def _job(root: Path, setting: str, seed: int, accs: list[float]) -> None:
    job = root / setting / f"seed={seed}"
    job.mkdir(parents=True)
    rows = [
        {"round": i, "eval_accuracy": a, "eval_loss": 1 - a} for i, a in enumerate(accs)
    ]
    (job / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = {
        "seed": seed,
        "final": {
            "eval_accuracy": accs[-1],
            "eval_loss": 1 - accs[-1],
            "epsilon": None,
        },
        "totals": {"bytes_up": 1_000_000, "bytes_down": 2_000_000},
    }
    (job / "summary.json").write_text(json.dumps(summary))


def test_report_groups_seeds_and_writes_table_and_plot(tmp_path: Path) -> None:
    _job(tmp_path, "federation.clients=4", 0, [0.25, 0.5])
    _job(tmp_path, "federation.clients=4", 1, [0.25, 0.7])
    _job(tmp_path, "federation.clients=8", 0, [0.25, 0.6])
    _job(tmp_path, "federation.clients=8", 1, [0.25, 0.6])
    jobs = find_jobs(tmp_path)
    assert len(jobs) == 4
    table = {r["setting"]: r for r in summarize(jobs)}
    four = table["federation.clients=4"]
    assert four["runs"] == 2 and four["seeds"] == "0,1"
    assert four["eval_accuracy_mean"] == pytest.approx(0.6)
    assert four["eval_accuracy_std"] == pytest.approx(statistics.stdev([0.5, 0.7]))
    assert table["federation.clients=8"]["eval_accuracy_std"] == 0.0
    assert "epsilon_mean" not in four  # no DP: no epsilon column
    assert four["mbytes_mean"] == pytest.approx(3.0)

    paths = write_report(tmp_path)
    md = paths["md"].read_text()
    assert "| federation.clients=4 | 2 | 0.6000 ± 0.1414" in md
    with paths["csv"].open() as fh:
        assert len(list(csv.DictReader(fh))) == 2
    assert paths["png"].stat().st_size > 1000


def test_report_on_an_empty_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No finished jobs"):
        write_report(tmp_path)


def test_the_legend_names_only_what_differs_between_jobs() -> None:
    settings = [
        "federation.client_ranks=[2,4],model=tiny_llama,seed_group=a",
        "federation.client_ranks=[2,8],model=tiny_llama,seed_group=a",
    ]
    common, labels = split_settings(settings)
    assert common == ["model=tiny_llama", "seed_group=a"]
    assert labels == ["federation.client_ranks=[2,4]", "federation.client_ranks=[2,8]"]
    assert split_settings(["a=1,b=2", "a=1,b=2"]) == (["a=1", "b=2"], ["", ""])
