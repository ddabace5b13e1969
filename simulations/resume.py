"""Continue a crashed simulated run from its last complete checkpoint.

Usage (from the repository root)::

    python -m simulations.resume outputs/2026-11-25/12-00-00
    python -m simulations.resume <run dir> --cpus-per-client 2

The run's own ``config.yaml`` is reused unchanged (plus ``resume=true``), so the
resumed rounds see exactly the settings of the first attempt; rounds after the
newest complete checkpoint are run again and their metrics rows replaced. A
deployed run resumes the same way through ``flwr run . <connection> --run-config
"resume=true output_dir='<run dir>' ..."`` with the original run-config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import yaml

from fedlora.config.flat import ConfigError
from simulations.experiment import (
    check_ray_address,
    run_experiment,
    write_run_config,
)
from strategies.config import ExperimentConfig
from strategies.server.checkpoint import flatten_dict, latest_checkpoint
from strategies.server.rundir import RunDir
from strategies.server.table import format_table


def resumed_config(run_dir: Path) -> ExperimentConfig:
    """Load the run's saved configuration with ``resume=true`` and its directory."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: not a fedlora run directory")
    saved = flatten_dict(yaml.safe_load(path.read_text()))
    saved.update({"resume": True, "output_dir": str(run_dir)})
    return ExperimentConfig.from_run_config(saved)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m simulations.resume")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--gpus-per-client", type=float, default=0.0)
    parser.add_argument(
        "--ray-address",
        default="",
        help="attach to this Ray cluster (host:port or auto), as launcher.ray_address",
    )
    args = parser.parse_args(argv)
    run_dir = args.run_dir.expanduser().resolve()
    try:
        check_ray_address(args.ray_address)
        cfg = resumed_config(run_dir)
    except ConfigError as err:
        print(f"fedlora: cannot resume: {err}", file=sys.stderr)
        sys.exit(2)
    done = latest_checkpoint(RunDir(run_dir))
    print(f"fedlora: resuming {run_dir} after round {done or 0}")
    attempt = 1 + len(list(run_dir.glob("flwr-resume-*")))
    run_config = run_dir / f"run_config-resume-{attempt}.toml"
    cfg = dataclasses.replace(cfg, resume=True)
    write_run_config(cfg, run_config)
    run_experiment(
        cfg,
        run_config,
        work_dir=run_dir / f"flwr-resume-{attempt}",
        log_file=run_dir / f"flwr-resume-{attempt}.log",
        cpus_per_client=args.cpus_per_client,
        gpus_per_client=args.gpus_per_client,
        ray_address=args.ray_address,
        live_client_logs=True,  # this command prints every line
    )
    rows = RunDir(run_dir).read_metrics()
    print(f"\nfedlora: run directory {run_dir}\n{format_table(rows)}")


if __name__ == "__main__":
    main()
