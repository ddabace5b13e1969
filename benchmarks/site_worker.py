"""One job, three ways: simulated, deployed today, deployed with the site worker.

The same federation (same run-config, same partitions) runs

1. ``simulation``: through the launcher (``python -m simulations.run``, Ray actors
   that live for the whole run);
2. ``deployed``: on a local TLS deployment (``simulations.deployment``: SuperLink,
   one SuperNode per site on 127.0.0.1), where the SuperNode starts a fresh
   ClientApp process for every message, which imports torch and loads the model;
3. ``deployed_worker``: the same deployment with ``site-worker=true``: the
   per-message process forwards to the site's long-lived worker;
4. ``deployed_in_worker``: each site started with ``python -m
   fedlora.client.supernode``: no process per message, the worker runs the
   ClientApp tasks itself, and the SuperNode polls the SuperLink every 0.25 s.

Per round (``metrics.jsonl``, the clients' timing metrics from
``fedlora.client.app``), the slowest client's time is split into::

    training   = client_train_seconds_max       # the local optimizer steps
    loading    = client_startup_seconds_max     # process start, imports
               + client_handler_seconds_max - training   # model, data, adapter
    evaluation = eval_seconds                   # the server's central evaluation
    other      = seconds - training - loading - evaluation
                 # messaging: Flower's polling, transport; aggregation, checkpoint

and the steady state is the mean over rounds >= 2. The headline is
``ratio_to_simulation``: steady-state round seconds of each mode over the
simulation's. Run one benchmark at a time on a quiet machine::

    python -m benchmarks.site_worker                       # tiny Llama, 3 sites
    python -m benchmarks.site_worker --model minilm        # the default MiniLM
    python -m benchmarks.site_worker --modes simulation deployed_worker
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.output import write_result

ROOT = Path(__file__).resolve().parents[1]
MODES = ("simulation", "deployed", "deployed_worker", "deployed_in_worker")
MODELS = {
    "tiny_llama": ["model=tiny_llama", "data=synthetic"],
    "minilm": ["model=minilm", "data=synthetic"],
}


def job_overrides(model: str, sites: int, rounds: int, steps: int) -> list[str]:
    """Launcher overrides of the benchmarked job."""
    return [
        *MODELS[model],
        f"federation.clients={sites}",
        f"federation.min_clients={sites}",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
    ]


def simulate(work: Path, overrides: list[str]) -> tuple[Path, float]:
    """Run the job through the launcher; return its run directory and wall time."""
    run_dir = work / "simulation"
    cmd = [sys.executable, "-m", "simulations.run", f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    subprocess.run(cmd + overrides, cwd=ROOT, check=True, capture_output=True)
    return run_dir, time.perf_counter() - start


def deploy(work: Path, run_config: Path, sites: int, name: str) -> tuple[Path, float]:
    """Run the same run-config on a local TLS deployment; return run dir, wall time."""
    import tomli
    import tomli_w

    from simulations.deployment import LocalDeployment

    out = work / name
    flat = tomli.loads(run_config.read_text())
    flat["output_dir"] = str(out)
    config = work / f"{name}.toml"
    config.write_text(tomli_w.dumps(flat))
    start = time.perf_counter()
    with LocalDeployment(work / f"{name}-deploy", sites=sites) as dep:
        for site in range(sites):
            dep.register(site)
            node = f"partition-id={site} num-partitions={sites}"
            if name != "deployed":
                node += f" state-dir='{work / name}-state{site}'"
            if name == "deployed_worker":
                node += " site-worker=true"
            dep.start_site(site, node, in_worker=name == "deployed_in_worker")
        done = dep.run(ROOT, config, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stdout[-3000:]}{done.stderr}")
    return out, time.perf_counter() - start


def split_rounds(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Each training round's seconds split into training, loading and other."""
    out = []
    for row in rows:
        if row["round"] == 0:
            continue
        training = float(row["client_train_seconds_max"])
        loading = (
            float(row.get("client_startup_seconds_max", 0.0))
            + float(row.get("client_handler_seconds_max", 0.0))
            - training
        )
        seconds = float(row["seconds"])
        evaluation = float(row.get("eval_seconds", 0.0))
        out.append(
            {
                "round": row["round"],
                "seconds": seconds,
                "training": training,
                "loading": loading,
                "evaluation": evaluation,
                "other": seconds - training - loading - evaluation,
                "model_loads": float(row.get("client_model_loads", 0.0)),
            }
        )
    return out


def steady(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Mean of every field over rounds >= 2."""
    later = [r for r in rounds if r["round"] >= 2]
    keys = ("seconds", "training", "loading", "evaluation", "other", "model_loads")
    return {k: statistics.fmean(r[k] for r in later) for k in keys}


def main(argv: list[str] | None = None) -> None:
    """Run the modes, print and write the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny_llama")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--keep", type=Path, default=None, help="work here and keep the logs"
    )
    args = parser.parse_args(argv)
    overrides = job_overrides(args.model, args.sites, args.rounds, args.steps)
    result: dict[str, Any] = {"job": overrides, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="site-worker-bench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        sim_dir, wall = simulate(work, overrides)  # also writes the run-config
        for mode in args.modes:
            if mode == "simulation":
                run_dir = sim_dir
            else:
                run_config = sim_dir / "run_config.toml"
                run_dir, wall = deploy(work, run_config, args.sites, mode)
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            rounds = split_rounds([json.loads(x) for x in lines])
            result["modes"][mode] = {
                "wall_seconds": wall,
                "rounds": rounds,
                "steady": steady(rounds),
            }
    base = result["modes"].get("simulation", {}).get("steady", {}).get("seconds")
    if base:
        result["ratio_to_simulation"] = {
            m: v["steady"]["seconds"] / base for m, v in result["modes"].items()
        }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_result(f"site_worker-{args.model}", stamp, result, args.out)


if __name__ == "__main__":
    main()
