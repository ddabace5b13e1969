"""Launch to exit, and the peak memory of the whole process tree, of one small run.

The job is FlowerTune's example shape on the tiny Llama: 4 clients, 2 sampled per
round, 3 rounds of 10 local steps of 8 x 128 tokens, QLoRA (NF4) with r = 8 on
q_proj and v_proj, with the held-out evaluation on the server after every round
(the data preset's default). ``--extra`` adds overrides to both sides:
``data.test_fraction=0`` (no central evaluation, as in FlowerTune's example: the
ServerApp then holds no model) or ``launcher.cpus_per_client=2`` (one client actor
using both cores instead of two with one each). Each run is ``python -m
simulations.run`` in a fresh process; the benchmark records:

- ``seconds``: launch to exit, split at the moments the run directory shows them:
  ``launcher`` (to ``run_config.toml``), ``to_server_app`` (to the ServerApp's
  ``config.yaml``), ``to_round_0`` (the first ``metrics.jsonl`` row), ``round_1``
  (with the Ray actors' cold start), ``rounds_2_on`` and ``teardown`` (last row to
  exit);
- ``peak_rss_mib``: the largest sum of resident memory over every process the run
  started (all carry ``FEDLORA_BENCH_ID`` in their environment, Ray's included;
  sampled every 0.2 s), with the process count and each group's share at that
  moment (``benchmarks.cpu_sampler`` groups). RSS counts shared library pages
  once per process, like ``ps``.

``--baseline <checkout>`` runs the same job from another checkout (e.g. a
``git worktree`` of an older commit) with this venv, alternating which variant
goes first in each pair, and reports medians and this/baseline ratios::

    git worktree add /tmp/base <commit>
    python -m benchmarks.light_run --runs 3 --baseline /tmp/base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.cpu_sampler import MARKER_ENV, _category
from benchmarks.output import write_result
from simulations.processes import marked_processes

ROOT = Path(__file__).resolve().parents[1]
JOB = (
    "model=tiny_llama",
    "data=synthetic_instruct",
    "federation.clients=4",
    "federation.fraction_train=0.5",
    "federation.min_clients=2",
    "federation.rounds=3",
    "federation.local_steps=10",
    "train.batch_size=8",
    "data.max_length=128",
    "adapter.rank=8",
    "adapter.target_modules=[q_proj,v_proj]",
)


@dataclass
class TreeMemory:
    """Peak summed RSS of the processes marked ``MARKER_ENV=marker``."""

    marker: str
    interval: float = 0.2
    peak_bytes: int = 0
    peak_count: int = 0
    peak_groups: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        """Sum the RSS of the marked processes and their descendants (Ray starts
        some of its agents with an environment of their own)."""
        import psutil

        ours = marked_processes(MARKER_ENV, self.marker, descendants=True)
        total, count, groups = 0, 0, dict[str, int]()
        for proc in ours:
            try:
                rss = int(proc.memory_info().rss)
                group = _category(" ".join(proc.cmdline()), ours=True)
            except psutil.Error:
                continue
            groups[group] = groups.get(group, 0) + rss
            total, count = total + rss, count + 1
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_count = total, count
            self.peak_groups = {k: round(v / 2**20) for k, v in sorted(groups.items())}

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop.set()


def _stamp_when(path: Path, stamps: dict[str, float], key: str) -> None:
    if key not in stamps and path.exists():
        stamps[key] = time.monotonic()


def one_run(
    checkout: Path, run_dir: Path, job: tuple[str, ...] = JOB
) -> dict[str, Any]:
    """Launch ``job`` from ``checkout``; return its seconds and peak memory."""
    marker = uuid.uuid4().hex
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{MARKER_ENV: marker})
    cmd = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}", *job]
    memory = TreeMemory(marker)
    sampler = threading.Thread(target=memory.run, daemon=True)
    stamps: dict[str, float] = {}
    rows_seen: list[float] = []
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    sampler.start()
    while proc.poll() is None:
        _stamp_when(run_dir / "run_config.toml", stamps, "config_written")
        _stamp_when(run_dir / "config.yaml", stamps, "server_app")
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists():
            count = sum(1 for x in metrics.read_text().splitlines() if x.strip())
            rows_seen += [time.monotonic()] * (count - len(rows_seen))
        time.sleep(0.05)
    end = time.monotonic()
    memory.stop()
    sampler.join()
    _, err = proc.communicate()
    if proc.returncode != 0 or len(rows_seen) < 3:
        raise RuntimeError(f"run failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    marks = [
        ("launcher", stamps["config_written"]),
        ("to_server_app", stamps["server_app"]),
        ("to_round_0", rows_seen[0]),
        ("round_1", rows_seen[1]),
        ("rounds_2_on", rows_seen[-1]),  # 0 s for a 1-round job
        ("teardown", end),
    ]
    seconds, before = {}, start
    for name, at in marks:
        seconds[name] = round(at - before, 2)
        before = at
    seconds["total"] = round(end - start, 2)
    return {
        "seconds": seconds,
        "round_seconds": [
            round(r["seconds"], 2)
            for r in map(
                json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()
            )
        ],
        "peak_rss_mib": round(memory.peak_bytes / 2**20),
        "processes_at_peak": memory.peak_count,
        "rss_mib_by_group_at_peak": memory.peak_groups,
    }


def _median(runs: list[dict[str, Any]], key: str, sub: str | None = None) -> float:
    values = [r[key][sub] if sub else r[key] for r in runs]
    return float(statistics.median(values))


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.light_run")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare")
    parser.add_argument("--out", type=Path, help="result file (default: results/)")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="overrides added to the job"
    )
    args = parser.parse_args(argv)
    job = (*JOB, *args.extra)
    variants = {"this": ROOT}
    if args.baseline:
        variants["baseline"] = args.baseline.resolve()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="light-run-") as tmp:
        for i in range(args.runs):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in order:
                result = one_run(variants[name], Path(tmp) / f"{name}-{i}", job)
                print(f"[light_run] {name} #{i}: {json.dumps(result)}", file=sys.stderr)
                runs[name].append(result)
    summary: dict[str, Any] = {
        name: {
            "total_seconds_median": _median(rs, "seconds", "total"),
            "peak_rss_mib_median": _median(rs, "peak_rss_mib"),
            "phases_median": {
                k: _median(rs, "seconds", k) for k in rs[0]["seconds"] if k != "total"
            },
        }
        for name, rs in runs.items()
    }
    if "baseline" in summary:
        this, base = summary["this"], summary["baseline"]
        summary["ratio_this_over_baseline"] = {
            "seconds": round(
                this["total_seconds_median"] / base["total_seconds_median"], 3
            ),
            "peak_rss": round(
                this["peak_rss_mib_median"] / base["peak_rss_mib_median"], 3
            ),
        }
    out = {
        "job": list(job),
        "cpu_count": os.cpu_count(),
        "baseline": str(args.baseline) if args.baseline else None,
        "summary": summary,
        "runs": runs,
    }
    write_result("light_run", time.strftime("%Y%m%d-%H%M%S"), out, args.out)


if __name__ == "__main__":
    main()
