"""Server durability: a complete checkpoint after every round, and resuming from it.

A checkpoint ``checkpoints/round-NNN/`` holds the global adapter exactly as the
server holds it (``global.safetensors``, every tensor, float32), the strategy's own
state (``strategy.pt``: e.g. FlexLoRA's SVDs, FLoRA's residual, SHE-LoRA's column
lists and summed ciphertexts, the DP reports) and, written last, ``state.json``; a
checkpoint without ``state.json`` was interrupted and is ignored. Resuming loads the
newest complete checkpoint, drops the metrics rows of later (lost) rounds and goes
on with the next round. Client training is a function of (seed, round, partition,
global adapter), so a resumed run ends with the same adapter as an uninterrupted
one; DP noise is drawn from OS-seeded randomness and is the exception. A restarted DP
client continues its accountant from its state directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from fedlora.config.flat import ConfigError, flatten_config
from fedlora.lora.state import StateDict
from strategies.config import ExperimentConfig
from strategies.fedavg_lora import FedAvgLora
from strategies.server.rundir import RunDir

GLOBAL_FILE = "global.safetensors"
STRATEGY_FILE = "strategy.pt"
# Keys that may differ between the crashed run and its resumption.
RESUME_FREE = ("resume", "output_dir")


def save_checkpoint(
    run_dir: RunDir, server_round: int, state: StateDict, strategy: FedAvgLora
) -> Path:
    """Write the checkpoint after ``server_round`` (state.json last)."""
    path = run_dir.checkpoint_dir(server_round)
    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(path / GLOBAL_FILE),
    )
    torch.save(strategy.checkpoint_state(), path / STRATEGY_FILE)
    run_dir.write_checkpoint_state(server_round, {"strategy": type(strategy).__name__})
    return path


def latest_checkpoint(run_dir: RunDir) -> int | None:
    """Newest round whose checkpoint is complete, or None."""
    rounds = [
        int(p.name.split("-")[1])
        for p in (run_dir.root / "checkpoints").glob("round-*")
        if (p / "state.json").exists() and (p / GLOBAL_FILE).exists()
    ]
    return max(rounds, default=None)


def check_same_config(run_dir: RunDir, cfg: ExperimentConfig) -> None:
    """Refuse to resume a run with a different configuration."""
    saved_path = run_dir.root / "config.yaml"
    if not saved_path.exists():
        raise ConfigError(f"resume: {run_dir.root} has no config.yaml; not a run dir")
    saved = flatten_config(
        ExperimentConfig.from_run_config(
            flatten_dict(yaml.safe_load(saved_path.read_text()))
        )
    )
    now = flatten_config(cfg)
    differ = sorted(
        k for k in now if k not in RESUME_FREE and saved.get(k) != now.get(k)
    )
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ConfigError(
            f"resume: the configuration differs from the run's config.yaml ({shown}); "
            "a resumed run must use the same settings"
        )


def flatten_dict(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> flat ``group.key`` dict (lists kept)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_dict(value, name + "."))
        else:
            out[name] = value
    return out


def resume_point(
    run_dir: RunDir, cfg: ExperimentConfig, strategy: FedAvgLora
) -> tuple[int, StateDict, list[dict[str, Any]]] | None:
    """Restore the strategy from the newest checkpoint; (round, state, rows).

    None when the run has no complete checkpoint (it then starts from round 1).
    The metrics file is rewritten without rows of rounds after the checkpoint.
    """
    check_same_config(run_dir, cfg)
    rnd = latest_checkpoint(run_dir)
    if rnd is None:
        return None
    path = run_dir.checkpoint_dir(rnd)
    state = load_file(str(path / GLOBAL_FILE))
    strategy.load_checkpoint_state(torch.load(path / STRATEGY_FILE, weights_only=True))
    rows = [r for r in run_dir.read_metrics() if int(r["round"]) <= rnd]
    run_dir.reset_metrics()
    for row in rows:
        run_dir.append_metrics(row)
    return rnd, dict(state), rows
