"""Peak memory and round time against the number of clients, 10 sampled per round.

A simulation's memory must depend on the clients that run at once (one base model
per Ray actor, partitions built when a client is sampled), and a round's time on
the clients sampled in it, not on how many exist. For each total N (default 10,
100 and 1,000) the same tiny-Llama job runs through the real launcher with
``federation.fraction_train = 10 / N``, and the benchmark reports the whole process
tree's peak RSS (``benchmarks.light_run.TreeMemory``) and the seconds per round
(round 1 includes the actors' start-up; the steady state is the mean of rounds
2 and on)::

    python -m benchmarks.many_clients                 # 10, 100, 1000 clients
    python -m benchmarks.many_clients --clients 10 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.light_run import ROOT, one_run
from benchmarks.output import write_result

SAMPLED = 10
BASE_JOB = (
    "model=tiny_llama",
    "data=synthetic_instruct",
    "data.num_examples=2400",  # >= 1 training row per client at 1,000 clients
    "federation.rounds=4",
    "federation.local_steps=5",
    "federation.fraction_evaluate=0.0",
    f"federation.min_clients={SAMPLED}",
    "train.batch_size=4",
)


def job_for(clients: int) -> tuple[str, ...]:
    """The job with ``clients`` clients of which ``SAMPLED`` train each round."""
    return (
        *BASE_JOB,
        f"federation.clients={clients}",
        f"federation.fraction_train={SAMPLED / clients:.6g}",
    )


def main(argv: list[str] | None = None) -> None:
    """CLI entry point (module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.many_clients")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--out", type=Path, help="result file (default: results/)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="many-clients-") as tmp:
        for n in args.clients:
            got = one_run(ROOT, Path(tmp) / f"n{n}", job_for(n))
            rounds = got["round_seconds"]
            got["steady_round_seconds"] = round(statistics.fmean(rounds[2:]), 2)
            results[str(n)] = got
            print(f"[many_clients] {n}: {got}", file=sys.stderr)
    peaks = [r["peak_rss_mib"] for r in results.values()]
    out = {
        "job": list(BASE_JOB),
        "sampled_per_round": SAMPLED,
        "clients": results,
        "peak_rss_max_over_min": round(max(peaks) / min(peaks), 3),
    }
    write_result("many_clients", time.strftime("%Y%m%d-%H%M%S"), out, args.out)


if __name__ == "__main__":
    main()
