"""Run one simulated federation, or a Hydra sweep of them, on Flower's runtime.

Commands (from the repository root)::

    python -m simulations.run                        # default job (~1.5 min, 2 CPUs)
    python -m simulations.run federation.rounds=10 adapter.rank=16
    python -m simulations.run model=tiny_llama data=synthetic_instruct
    python -m simulations.run data=local data.path=train.tsv data.text_column=sentence
    python -m simulations.run -m federation.clients=4,8 seed=0,1   # sweep: 4 jobs
    python -m simulations.run hydra.run.dir=/tmp/smoke federation.rounds=1  # smoke

Each job: 1. compose the Hydra config, 2. validate it through the typed dataclasses
(nothing loads if a value is wrong) and read the local data files as the clients
will (a bad file stops the job here, exit code 2, with the file, row or column and
the fix), 3. write the flat Flower run-config, 4. start a
private Flower SuperLink in simulation mode and run the app with ``flwr run`` (every
process it starts is stopped by PID at the end, also on Ctrl-C), 5. print a
summary line. The console shows the round table as it grows and the warnings that
matter; everything else goes to ``<run dir>/flwr.log`` (``launcher.verbose=true``
prints it all).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedlora.config.flat import ConfigError
from simulations.console import Console, summary_line
from simulations.experiment import (
    CONF_DIR,
    check_outside_app,
    from_hydra,
    run_experiment,
    write_run_config,
)
from strategies.config import ExperimentConfig
from strategies.server.rundir import RunDir


def with_he_keys(experiment: ExperimentConfig) -> ExperimentConfig:
    """SHE-LoRA without given contexts: make a fresh pair in the run directory.

    The server gets the public file, the simulated clients the secret one (a
    deployment creates them with ``python -m fedlora.she.keys`` instead).
    """
    strategy = experiment.strategy
    if strategy.name != "she_lora" or strategy.he_public_context:
        return experiment
    from fedlora.she.keys import create_contexts

    secret, public = create_contexts(Path(experiment.output_dir) / "he-keys")
    strategy = dataclasses.replace(
        strategy,
        he_public_context=str(public),
        he_secret_context=strategy.he_secret_context or str(secret),
    )
    return dataclasses.replace(experiment, strategy=strategy)


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one call per job (one per sweep point with ``-m``)."""
    # 1-2. compose + validate (the config and the local data files)
    container = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    try:
        experiment, launch = from_hydra(container)
    except ConfigError as err:
        print(f"fedlora: invalid configuration: {err}", file=sys.stderr)
        sys.exit(2)
    job_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    try:
        check_outside_app(job_dir)
    except ConfigError as err:
        print(f"fedlora: invalid run directory: {err}", file=sys.stderr)
        sys.exit(2)
    if not experiment.output_dir:
        experiment = dataclasses.replace(experiment, output_dir=str(job_dir))
    experiment = with_he_keys(experiment)
    # 3. Flower run-config
    run_config = job_dir / "run_config.toml"
    write_run_config(experiment, run_config)
    # 4. launch on a private SuperLink; all its processes stop on exit
    console = Console(verbose=launch.verbose)
    run_experiment(
        experiment,
        run_config,
        work_dir=job_dir / "flwr",
        log_file=job_dir / "flwr.log",
        cpus_per_client=launch.cpus_per_client,
        gpus_per_client=launch.gpus_per_client,
        ray_address=launch.ray_address,
        live_client_logs=launch.verbose,
        log=console,
    )
    # 5. results
    rows = RunDir(Path(experiment.output_dir)).read_metrics()
    console.write(summary_line(rows, experiment.output_dir))


if __name__ == "__main__":
    main()
