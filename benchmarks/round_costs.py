"""Where a federated round's time, bytes and memory go.

Three reports, printed as one JSON object and written to
``benchmarks/results/round_costs-<timestamp>.json`` (the folder is gitignored):

1. ``rounds``: each round's wall time split into local training, centralised
   evaluation and everything else, for a federation launched through the real
   launcher (``python -m simulations.run hydra.run.dir=<dir> <overrides>``). With
   P parallel ClientApp actors and N clients in the round::

       train_busy = client_train_seconds_sum / min(P, N)  # ideal parallel training
       other      = seconds - train_busy - eval_seconds   # transport, (de)serial-
                                                          # isation, scheduling, idle
                                                          # actors, aggregation, I/O
   ``other`` is further split into ``train_phase_overhead`` (train_phase_seconds -
   train_busy: messaging, Ray scheduling, client-side model/adapter loading,
   stragglers) and ``server_side`` (seconds - train_phase_seconds - eval_seconds:
   aggregation, federated evaluation, checkpoint writing). The steady state is the
   mean over rounds >= 2 (round 1 pays the actors' start-up). Project target:
   ``steady_state.fraction.other <= 0.10``.
   ``cpu`` gives the CPU seconds each process group used over the run and in each
   round's train and eval windows (``benchmarks.cpu_sampler``); ``foreign`` is
   every process this benchmark did not start. Check ``cores_busy.foreign`` before
   trusting a timing: on a 2-core machine one busy foreign core made the ServerApp's
   evaluation 5-10x slower with torch's default 2 OpenMP threads.
2. ``bytes``: serialised bytes per client per round each way (metrics.jsonl
   divided by the clients of the round) against the raw adapter size
   (``summary.json`` ``adapter.parameters`` x the bytes per value of the run's
   ``federation.transport_dtype``: 4 for float32, 2 for bfloat16 / float16).
   Compare dtypes with ``-o federation.transport_dtype=bfloat16``.
3. ``memory``: one client's peak RSS, RSS after loading, the model's
   ``get_memory_footprint()`` and seconds per local step, with an NF4 and a float32
   base, each measured in a fresh subprocess that builds the client model and runs
   ``fedlora.client.round.train_round`` twice (site 0 of 8, torch threads = the
   actors'),
   with NF4/float32 ratios; see ``benchmarks.client_memory``.

Commands (from the repository root; run one benchmark at a time, the federation
uses every core)::

    python -m benchmarks.round_costs                          # default job + memory
    python -m benchmarks.round_costs -o federation.rounds=3   # shorter federation
    python -m benchmarks.round_costs -o model=tiny_llama -o data=synthetic_instruct
    python -m benchmarks.round_costs --skip-memory            # federation only
    python -m benchmarks.round_costs --skip-federation        # memory only
    python -m benchmarks.round_costs --skip-federation --memory-models tiny_llama-512x16
    python -m benchmarks.round_costs --from-run outputs/<run>  # re-analyse a run

``-o`` takes any launcher (Hydra) override and may be repeated; ``--parallel``
overrides P (default: ``os.cpu_count() // launcher.cpus_per_client``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.client_memory import DEFAULT_MEMORY_MODELS, MEMORY_MODELS, memory_report
from benchmarks.cpu_sampler import MARKER_ENV, CpuSampler, cpu_report, watch_rows
from benchmarks.output import RESULTS, write_result
from fedlora.protocol import TRANSPORT_DTYPES

ROOT = Path(__file__).resolve().parent.parent
STEADY_FROM_ROUND = 2
TARGET_OTHER_FRACTION = 0.10


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def split_round(row: Mapping[str, Any], parallel: int) -> dict[str, Any]:
    """Split one metrics.jsonl row (round >= 1) into seconds and fractions.

    Parameters
    ----------
    row : Mapping[str, Any]
        A row of ``metrics.jsonl`` with ``seconds``, ``train_phase_seconds``,
        ``client_train_seconds_sum``, ``eval_seconds`` and ``clients``.
    parallel : int
        P, the number of ClientApp actors that run at once.

    Returns
    -------
    dict[str, Any]
        ``seconds`` (absolute, s) and ``fraction`` (of the round's wall time) for
        ``round``, ``train_busy``, ``eval``, ``other``, ``train_phase_overhead``
        and ``server_side``.
    """
    total = float(row["seconds"])
    clients = max(1, int(row.get("clients_sampled") or row["clients"]))
    busy = float(row["client_train_seconds_sum"]) / min(parallel, clients)
    evaluation = float(row["eval_seconds"])
    phase = float(row["train_phase_seconds"])
    secs = {
        "round": total,
        "train_busy": busy,
        "eval": evaluation,
        "other": total - busy - evaluation,
        "train_phase_overhead": phase - busy,
        "server_side": total - phase - evaluation,
    }
    return {
        "round": int(row["round"]),
        "clients": clients,
        "concurrency": min(parallel, clients),
        "client_train_seconds_max": float(row["client_train_seconds_max"]),
        "seconds": secs,
        "fraction": {k: v / total for k, v in secs.items() if k != "round"},
    }


def steady_state(splits: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean seconds and fractions over rounds >= 2 (None if there are none)."""
    steady = [s for s in splits if s["round"] >= STEADY_FROM_ROUND]
    if not steady:
        return None
    keys = steady[0]["seconds"].keys()
    secs = {k: statistics.fmean(s["seconds"][k] for s in steady) for k in keys}
    # Fraction of the mean round (not the mean of fractions): time-weighted.
    fraction = {k: v / secs["round"] for k, v in secs.items() if k != "round"}
    return {
        "rounds": [s["round"] for s in steady],
        "seconds": secs,
        "fraction": fraction,
        "target_other_fraction": TARGET_OTHER_FRACTION,
        "meets_target": fraction["other"] <= TARGET_OTHER_FRACTION,
    }


def round_report(rows: Sequence[Mapping[str, Any]], parallel: int) -> dict[str, Any]:
    """Per-round split, steady-state mean and the initial evaluation (round 0)."""
    splits = [split_round(r, parallel) for r in rows if int(r["round"]) >= 1]
    initial = next((r for r in rows if int(r["round"]) == 0), None)
    return {
        "parallel_actors": parallel,
        "initial_eval_seconds": None if initial is None else initial["seconds"],
        "per_round": splits,
        "steady_state": steady_state(splits),
    }


# --------------------------------------------------------------------------- #
# 2. Bytes per client per round
# --------------------------------------------------------------------------- #


def bytes_report(
    rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> dict[str, Any]:
    """Serialised bytes per client per round each way vs the raw wire adapter.

    Down is divided by the clients sampled (every one was sent the adapter), up by
    the clients whose reply was accepted (the same unless replies were dropped).
    The raw size counts the run's transport dtype (runs from before the key
    existed were float32).
    """
    params = int(summary["adapter"]["parameters"])
    federation = summary.get("config", {}).get("federation", {})
    dtype = str(federation.get("transport_dtype", "float32"))
    raw = TRANSPORT_DTYPES[dtype] * params
    per_round = []
    for row in rows:
        if int(row["round"]) < 1 or not row.get("clients"):
            continue
        sampled = int(row.get("clients_sampled") or row["clients"])
        down = row["bytes_down"] / max(1, sampled)
        up = row["bytes_up"] / int(row["clients"])
        per_round.append({"round": int(row["round"]), "down": down, "up": up})
    down = _mean([r["down"] for r in per_round])
    up = _mean([r["up"] for r in per_round])
    return {
        "adapter_parameters": params,
        "transport_dtype": dtype,
        "raw_adapter_bytes": raw,
        "raw_float32_bytes": 4 * params,
        "per_client_per_round": per_round,
        "mean_down": down,
        "mean_up": up,
        "overhead_ratio_down": None if down is None else down / raw,
        "overhead_ratio_up": None if up is None else up / raw,
    }


def _launcher_int(overrides: Sequence[str], key: str, default: int) -> int:
    for item in overrides:
        name, _, value = item.lstrip("+").partition("=")
        if name == key:
            return int(value)
    return default


def run_federation(overrides: Sequence[str], run_dir: Path) -> dict[str, Any]:
    """Launch ``python -m simulations.run`` and account CPU while it runs."""
    marker = uuid.uuid4().hex
    env = {**os.environ, MARKER_ENV: marker, "HF_HUB_OFFLINE": "1"}
    paths = [str(ROOT), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    cmd = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}"]
    cmd += overrides
    run_dir.mkdir(parents=True, exist_ok=True)
    stamps: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(
        target=watch_rows, args=(run_dir / "metrics.jsonl", stop, stamps), daemon=True
    )
    print(f"[round_costs] {' '.join(cmd)}", file=sys.stderr)
    with CpuSampler(marker) as sampler, (run_dir / "launcher.log").open("w") as log:
        watcher.start()
        started = time.monotonic()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        )
        ended = time.monotonic()
        stop.set()
        watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(
            f"launcher exited with {proc.returncode}; see {run_dir / 'launcher.log'}"
        )
    rows = _read_rows(run_dir)
    return {
        "command": cmd,
        "launcher_seconds": round(ended - started, 2),
        "cpu": cpu_report(sampler, (started, ended), stamps, rows),
    }


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    text = (run_dir / "metrics.jsonl").read_text()
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def analyse_run(run_dir: Path, parallel: int) -> dict[str, Any]:
    """Rounds and bytes reports from a finished run directory."""
    rows = _read_rows(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "run_dir": str(run_dir),
        "rounds": round_report(rows, parallel),
        "bytes": bytes_report(rows, summary),
        "serverapp_total_seconds": summary["totals"]["seconds"],
    }


def _rounded(value: Any, digits: int = 4) -> Any:
    """Round every float in a nested structure (JSON readability)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return value


def _host() -> dict[str, Any]:
    import torch

    return {
        "cores": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "torch_threads_default": torch.get_num_threads(),
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        help="Hydra override for the launcher (repeatable)",
    )
    parser.add_argument("--run-dir", type=Path, help="run dir (default: results/runs/)")
    parser.add_argument("--from-run", type=Path, help="analyse this finished run")
    parser.add_argument("--parallel", type=int, help="P (default: cores // cpus)")
    parser.add_argument("--skip-federation", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--memory-models",
        nargs="*",
        choices=list(MEMORY_MODELS),
        default=list(DEFAULT_MEMORY_MODELS),
    )
    parser.add_argument("--threads", type=int, help="torch threads in memory probes")
    parser.add_argument("--output", type=Path, help="JSON file (default: results/)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected reports; print and save them as JSON."""
    args = _parse(argv)
    cpus = _launcher_int(args.override, "launcher.cpus_per_client", 1)
    threads = args.threads or cpus
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parallel = args.parallel or max(1, (os.cpu_count() or 1) // cpus)
    out: dict[str, Any] = {"host_at_start": _host(), "overrides": args.override}
    if args.from_run:
        out["federation"] = analyse_run(args.from_run.resolve(), parallel)
    elif not args.skip_federation:
        run_dir = (args.run_dir or RESULTS / "runs" / stamp).resolve()
        launched = run_federation(args.override, run_dir)
        out["federation"] = {**analyse_run(run_dir, parallel), **launched}
    if not args.skip_memory:
        models = {m: MEMORY_MODELS[m] for m in args.memory_models}
        out["memory"] = memory_report(models, threads)
        out["memory_torch_threads"] = threads
    out["host_at_end"] = {"loadavg": os.getloadavg()}
    out = _rounded(out)
    write_result("round_costs", stamp, out, args.output)
    return out


if __name__ == "__main__":
    main()
