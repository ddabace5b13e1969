"""The server's round loop: train, validate + aggregate, evaluate, record, checkpoint.

Written against ``Grid`` rather than ``Strategy.start`` so each round's bytes,
timings and dropped replies land in ``metrics.jsonl`` and a checkpoint exists after
every round (a later resume starts from it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedlora import protocol as proto
from fedlora.lora.state import StateDict, from_record, to_record
from strategies.config import ExperimentConfig
from strategies.fedavg_lora import FedAvgLora
from strategies.server.checkpoint import resume_point, save_checkpoint
from strategies.server.evaluator import ServerModel, eval_fields
from strategies.server.exchange import send_and_receive
from strategies.server.rundir import RunDir


@dataclass
class FederationResult:
    """Final global adapter and every metrics row."""

    state: StateDict
    rows: list[dict[str, Any]]


def run_federation(
    grid: Grid,
    cfg: ExperimentConfig,
    strategy: FedAvgLora,
    evaluator: ServerModel,
    run_dir: RunDir,
    *,
    on_row: Callable[[dict[str, Any]], None] = lambda row: None,
) -> FederationResult:
    """Run ``cfg.federation.rounds`` rounds and record each in ``run_dir``.

    With ``cfg.resume`` the run continues after its newest complete checkpoint.
    """
    resumed = resume_point(run_dir, cfg, strategy) if cfg.resume else None
    if resumed is not None:
        done, state, rows = resumed
        log(INFO, "fedlora: resuming after round %d from %s", done, run_dir.root)
    else:
        done, state, rows = 0, evaluator.initial_state(), []
        run_dir.reset_metrics()
        t0 = time.perf_counter()
        first = {
            "round": 0,
            "train_loss": None,
            **evaluator.fields(state),
            "epsilon": None,
            "clients": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "seconds": time.perf_counter() - t0,
        }
        rows = [first]
        run_dir.append_metrics(first)
        on_row(first)
    # The server's own copy between rounds: float32 whatever the transport dtype
    # (strategies encode what they send with ``FedAvgLora.wire``).
    arrays: ArrayRecord = to_record(state)
    timeout = cfg.federation.round_timeout
    for rnd in range(done + 1, cfg.federation.rounds + 1):
        start = time.perf_counter()
        messages = strategy.configure_train(rnd, arrays, evaluator.config(), grid)
        replies = send_and_receive(grid, messages, timeout, round_=rnd)
        train_end = time.perf_counter()
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
        if new_arrays is not None:
            arrays = new_arrays
        fed_eval = _federated_evaluation(
            grid, strategy, rnd, arrays, timeout, evaluator.config()
        )
        state = from_record(arrays)
        eval_start = time.perf_counter()
        if strategy.server_can_evaluate:
            residual = strategy.base_residual()
            central = evaluator.fields(state, residual)
            evaluator.save(state, run_dir.checkpoint_dir(rnd), residual)
        else:  # only key holders can rebuild the model: federated evaluation only
            central = eval_fields(None)
            run_dir.checkpoint_dir(rnd).mkdir(parents=True, exist_ok=True)
        eval_seconds = time.perf_counter() - eval_start
        save_checkpoint(run_dir, rnd, state, strategy)
        stats = strategy.stats[rnd]
        row = {
            "round": rnd,
            "train_loss": stats.train_loss,
            **central,
            "epsilon": stats.epsilon,
            "clients": stats.accepted,
            # False: fewer valid replies than min_clients, global adapter unchanged
            "round_applied": new_arrays is not None,
            "clients_exhausted": len(stats.exhausted),
            "clients_sampled": stats.sampled,
            "clients_dropped": len(stats.dropped),
            "dropped": [{"node": n, "reason": r} for n, r in stats.dropped],
            "client_nodes": stats.placement,
            "bytes_up": stats.bytes_up,
            "bytes_down": stats.bytes_down,
            "train_phase_seconds": train_end - start,
            "client_train_seconds_sum": sum(stats.client_train_seconds),
            "client_train_seconds_max": max(stats.client_train_seconds, default=0.0),
            "eval_seconds": eval_seconds,
            **fed_eval,
            **stats.extra,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        run_dir.append_metrics(row)
        on_row(row)
    return FederationResult(state=state, rows=rows)


def _federated_evaluation(
    grid: Grid,
    strategy: FedAvgLora,
    rnd: int,
    arrays: ArrayRecord,
    timeout: float,
    config: ConfigRecord,
) -> dict[str, Any]:
    messages = list(strategy.configure_evaluate(rnd, arrays, config, grid))
    if not messages:
        return {}
    replies = send_and_receive(grid, messages, timeout, round_=rnd)
    metrics = strategy.aggregate_evaluate(rnd, replies)
    if metrics is None:
        return {}
    return {
        f"fed_{k.replace('-', '_')}": v
        for k, v in metrics.items()
        if k != proto.NUM_EXAMPLES
    }
