"""CPU seconds per process group while a federation runs (sampled from /proc).

Used by ``benchmarks.round_costs``. Processes the benchmark starts carry
``FEDLORA_BENCH_ID=<marker>`` in their environment (inherited by the launcher,
SuperLink, SuperExec, ``flwr-simulation`` and Ray's processes); every other process
on the machine is ``foreign``: other work that competes for the same cores.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER_ENV = "FEDLORA_BENCH_ID"


def _category(cmdline: str, ours: bool) -> str:
    """Process group of a command line; first match wins, so the catch-all last."""
    if not ours:
        return "foreign"
    rules = (
        ("ray::", "ray_workers"),  # ClientAppActor (and idle Ray workers)
        ("default_worker.py", "ray_workers"),  # a Ray worker before it renames
        ("flwr-simulation", "serverapp"),  # ServerApp + simulation engine + Ray driver
        ("flower-superlink", "superlink"),
        ("flower-superexec", "superexec"),
        ("/ray/", "ray_system"),  # raylet, gcs_server, agents, log monitor
        ("simulations.run", "launcher"),
        ("benchmarks.round_costs", "benchmark"),
    )
    for needle, name in rules:
        if needle in cmdline:
            return name
    return "other_ours"


@dataclass
class CpuSampler:
    """Cumulative CPU seconds per process group, sampled every ``interval`` s.

    Processes we started carry ``MARKER_ENV=marker`` in their environment (it is
    inherited by the launcher, SuperLink, ``flwr-simulation`` and Ray's processes).
    """

    marker: str
    interval: float = 0.5
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    _last: dict[tuple[int, float], tuple[str, float]] = field(default_factory=dict)
    _totals: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _classify(self, proc: Any) -> str:
        import psutil

        try:
            env = proc.environ()
        except psutil.Error:
            env = {}
        ours = env.get(MARKER_ENV) == self.marker or proc.pid == os.getpid()
        try:
            cmdline = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            cmdline = ""
        return _category(cmdline, ours)

    def sample(self) -> None:
        """Add every process's CPU time since the previous sample to its group."""
        import psutil

        for proc in psutil.process_iter():
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
            except psutil.Error:
                continue
            cpu = times.user + times.system
            group, before = self._last.get(key, ("", 0.0))
            if not group:
                group = self._classify(proc)
                # A process born before the first sample only counts from now on.
                before = cpu if not self.samples else 0.0
            self._totals[group] = self._totals.get(group, 0.0) + cpu - before
            self._last[key] = (group, cpu)
        self.samples.append((time.monotonic(), dict(self._totals)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> CpuSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds per group between two monotonic times (nearest samples)."""

        def at(t: float) -> dict[str, float]:
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]

        first, last = at(start), at(end)
        return {k: round(v - first.get(k, 0.0), 2) for k, v in sorted(last.items())}


def watch_rows(path: Path, stop: threading.Event, stamps: list[float]) -> None:
    """Record the monotonic time at which each metrics.jsonl row appears."""
    while not stop.wait(0.2):
        try:
            count = sum(1 for ln in path.read_text().splitlines() if ln.strip())
        except OSError:
            continue
        now = time.monotonic()
        while len(stamps) < count:
            stamps.append(now)


def _phase(sampler: CpuSampler, start: float, end: float) -> dict[str, Any]:
    cpu = sampler.between(start, end)
    wall = max(end - start, 1e-9)
    return {
        "wall": round(wall, 2),
        "cpu": cpu,
        "cores_busy": {k: round(v / wall, 2) for k, v in cpu.items()},
    }


def cpu_report(
    sampler: CpuSampler,
    window: tuple[float, float],
    stamps: Sequence[float],
    rows: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """CPU seconds per process group: whole run, and each round's train and eval.

    A round's eval window is the ``eval_seconds + server_side`` before its row
    was written (the row follows evaluation and a checkpoint save); the train
    window is the rest of the round. ``cores_busy`` = CPU seconds / wall seconds.
    Resolution: the sampler's interval (0.5 s) and the row watcher's (0.2 s).
    """
    cores = os.cpu_count() or 1
    started, ended = window
    whole = sampler.between(started, ended)
    per_round = []
    # stamps[i] is when row i (round i) appeared; round 0 is the initial eval.
    for row, begin, end in zip(rows[1:], stamps, stamps[1:], strict=False):
        tail = float(row["seconds"]) - float(row["train_phase_seconds"])
        per_round.append(
            {
                "round": int(row["round"]),
                "train": _phase(sampler, begin, end - tail),
                "eval": _phase(sampler, end - tail, end),
            }
        )
    return {
        "cores": cores,
        "wall_seconds": round(ended - started, 2),
        "whole_run": whole,
        "foreign_share_of_capacity": round(
            whole.get("foreign", 0.0) / (cores * (ended - started)), 3
        ),
        "per_round": per_round,
    }
