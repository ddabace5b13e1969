"""Hydra config -> validated dataclasses -> Flower run-config (the one boundary).

Only ``simulations/`` knows Hydra. It composes ``conf/``, validates through the
same dataclasses the apps use (``ExperimentConfig``), flattens to Flower's flat
run-config with ``fedlora.config.flat.flatten_config`` and writes it as TOML for
``flwr run --run-config``; :func:`run_experiment` is the launch that
``simulations.run`` and ``simulations.resume`` share.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.config import DataConfig
from fedlora.config.flat import ConfigError, build_config, check_range, flatten_config
from fedlora.data.preflight import check_data_files
from simulations.flower_runtime import LocalSimulation
from strategies.config import ExperimentConfig
from strategies.server.rundir import FINISHED_LOG

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"


@dataclass(frozen=True)
class LaunchConfig:
    """How the launcher runs a simulation (not part of the run-config)."""

    cpus_per_client: int = field(default=1, metadata={"help": "CPU cores per client."})
    gpus_per_client: float = field(
        default=0.0, metadata={"help": "GPU share per client (0.5 = two per GPU)."}
    )
    ray_address: str = field(
        default="",
        metadata={
            "help": "Run the clients on an existing Ray cluster: its address "
            "(host:port of the head, as `ray start --head` prints, or 'auto' on a "
            "cluster node); attached to, never started or stopped. Empty: a private "
            "Ray instance on this machine for the run."
        },
    )

    verbose: bool = field(
        default=False,
        metadata={
            "help": "Print every line of the run (Flower, Ray actors, libraries); "
            "false: the round table, warnings that matter and a summary. The full "
            "output is in <run dir>/flwr.log, except, without verbose, what the "
            "client actors print: <run dir>/flwr/client_logs/ (saves Ray's log "
            "monitor, ~80 MiB)."
        },
    )

    def __post_init__(self) -> None:
        check_range("launcher.cpus_per_client", self.cpus_per_client, low=1)
        check_range("launcher.gpus_per_client", self.gpus_per_client, low=0)
        check_ray_address(self.ray_address)


def check_ray_address(address: str) -> None:
    """Accept '', 'auto' or host:port (Ray's GCS address); else name the forms."""
    host, _, port = address.rpartition(":")
    plain = host and "/" not in host and port.isdigit() and 0 < int(port) < 65536
    if address in ("", "auto") or plain:
        return
    raise ConfigError(
        f"launcher.ray_address={address!r}: allowed are '' (a private Ray instance), "
        "'auto' (the cluster this machine is part of) or host:port of the cluster's "
        "head (e.g. 10.0.0.5:6379); Ray Client (ray://) is not supported: the "
        "driver runs on a cluster node"
    )


def from_hydra(container: dict[str, Any]) -> tuple[ExperimentConfig, LaunchConfig]:
    """Validate a resolved Hydra config (as a plain dict) into dataclasses.

    The local data files are read as the clients will read them
    (:func:`fedlora.data.preflight.check_data_files`), and their paths made
    absolute.

    Raises
    ------
    ConfigError
        Naming the key, the value and what is allowed, or the data file, the row or
        column and the fix (before Flower starts).
    """
    values = {k: v for k, v in container.items() if k not in ("hydra", "launcher")}
    experiment = build_config(ExperimentConfig, values)
    launch = build_config(LaunchConfig, container.get("launcher") or {})
    check_data_files(experiment.data)
    data = absolute_paths(experiment.data)
    if data != experiment.data:
        experiment = dataclasses.replace(experiment, data=data)
    return experiment, launch


def absolute_paths(data: DataConfig) -> DataConfig:
    """Make ``data.path`` (source local) and ``data.test_path`` absolute.

    The clients run in Flower's processes, whose working directory is not the
    launcher's: a relative path the preflight read would name another file there.
    """
    path = _absolute(data.path) if data.source == "local" else data.path
    test_path = _absolute(data.test_path)
    if (path, test_path) == (data.path, data.test_path):
        return data
    return dataclasses.replace(data, path=path, test_path=test_path)


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve()) if path else ""


def write_run_config(experiment: ExperimentConfig, path: Path) -> dict[str, Any]:
    """Write the flat run-config TOML for ``flwr run --run-config``; returns it."""
    flat = flatten_config(experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(flat))
    return flat


def pyproject_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project's pyproject.toml (flattened)."""
    import tomli

    data = tomli.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    table = data["tool"]["flwr"]["app"]["config"]
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(table, "")
    return out


# Run-config keys whose default ("auto") ExperimentConfig resolves when it is built
# (from the model): pyproject declares "auto" so an override of the model re-resolves.
RESOLVED_WHEN_BUILT = {"data.prompt_format": "auto"}


def default_run_config() -> dict[str, Any]:
    """Return the flat run-config defaults as pyproject.toml declares them."""
    return {**flatten_config(ExperimentConfig()), **RESOLVED_WHEN_BUILT}


def render_pyproject_section(experiment: ExperimentConfig | None = None) -> str:
    """``[tool.flwr.app.config]`` TOML for the defaults (one table per group)."""
    flat = flatten_config(experiment) if experiment else default_run_config()
    top = {k: v for k, v in flat.items() if "." not in k}
    groups: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if "." in key:
            group, name = key.split(".", 1)
            groups.setdefault(group, {})[name] = value
    lines = ["[tool.flwr.app.config]", tomli_w.dumps(top).strip()]
    for group, values in groups.items():
        lines += ["", f"[tool.flwr.app.config.{group}]", tomli_w.dumps(values).strip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    # Print the run-config defaults to paste into pyproject.toml after adding a key.
    print(render_pyproject_section(), end="")


def check_outside_app(run_dir: Path, root: Path = PROJECT_ROOT) -> None:
    """Refuse a run directory that ``flwr run`` would package into the app.

    Flower zips the app directory minus what ``.gitignore`` excludes; a run
    directory inside it (with the Flower home and app copies of earlier runs) ends
    up in every later app package and breaks its size and depth limits.
    """
    run_dir = run_dir.resolve()
    if not run_dir.is_relative_to(root.resolve()):
        return
    rel = run_dir.relative_to(root.resolve())
    try:
        ignored = (
            subprocess.run(
                ["git", "check-ignore", "-q", str(rel)],
                cwd=root,
                capture_output=True,
                timeout=10,
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        ignored = rel.parts[:1] in (("outputs",), ("multirun",))
    if not ignored:
        raise ConfigError(
            f"run directory {run_dir} is inside the app directory {root} and not "
            "ignored by .gitignore, so Flower would package it (and every earlier run "
            "in it) into the app; use outputs/... or multirun/... (ignored) or a "
            "directory outside the project"
        )


def run_experiment(
    experiment: ExperimentConfig,
    run_config: Path,
    *,
    work_dir: Path,
    log_file: Path,
    cpus_per_client: int,
    gpus_per_client: float,
    ray_address: str = "",
    live_client_logs: bool = False,
    log: Callable[[str], Any] = print,
) -> None:
    """Run ``run_config`` (written from ``experiment``) on a private SuperLink.

    Every process it starts is stopped on exit. ``live_client_logs`` streams the
    ClientApp actors' output into ``log_file`` as it happens; otherwise it is kept
    in ``work_dir/client_logs/`` (:mod:`simulations.ray_head`).
    """
    with LocalSimulation(
        work_dir=work_dir,
        log=log,
        ray_address=ray_address,
        live_client_logs=live_client_logs,
    ) as sim:
        sim.run(
            PROJECT_ROOT,
            run_config=run_config,
            num_supernodes=experiment.federation.clients,
            cpus_per_client=cpus_per_client,
            gpus_per_client=gpus_per_client,
            log_file=log_file,
            last_line=FINISHED_LOG,
        )
