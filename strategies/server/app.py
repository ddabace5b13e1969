"""Flower ServerApp: rebuild the config, run the rounds, write the run directory."""

from __future__ import annotations

import time
from datetime import datetime
from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedlora.lora.state import num_params
from strategies.config import ExperimentConfig
from strategies.registry import build_strategy
from strategies.server.evaluator import EVAL_FIELDS, server_model
from strategies.server.plots import plot_run, prefetch
from strategies.server.rounds import run_federation
from strategies.server.rundir import FINISHED_LOG, RunDir, config_dict, versions
from strategies.server.table import format_table, run_columns

app = ServerApp()


def resolve_output_dir(cfg: ExperimentConfig, run_id: int) -> Path:
    """``cfg.output_dir`` or ``./outputs/flwr-run/<timestamp>-<run id>``."""
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path.cwd() / "outputs" / "flwr-run" / f"{stamp}-{run_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a federated LoRA fine-tuning job end to end."""
    started = time.perf_counter()
    prefetch()  # matplotlib, for the plots at the end
    cfg = ExperimentConfig.from_run_config(context.run_config)
    run_dir = RunDir(resolve_output_dir(cfg, context.run_id))
    if not cfg.resume:
        run_dir.write_config(cfg)
    log(INFO, "fedlora: writing the run directory to %s", run_dir.root)
    strategy = build_strategy(cfg)
    evaluator = server_model(cfg, strategy.server_can_evaluate, grid)
    header_printed = [False]
    columns = run_columns(
        cfg.data.task, cfg.privacy.mode == "dp", cfg.train.eval_generate > 0
    )

    def on_row(row: dict[str, object]) -> None:
        lines = format_table([row], columns).splitlines()
        if not header_printed[0]:
            for line in lines[:2]:
                log(INFO, "%s", line)
            header_printed[0] = True
        log(INFO, "%s", lines[-1])

    result = run_federation(grid, cfg, strategy, evaluator, run_dir, on_row=on_row)
    adapter_dir = (
        run_dir.finalize_adapter(cfg.federation.rounds)
        if strategy.server_can_evaluate
        else None  # SHE-LoRA: the merged adapter exists only at the key holders
    )
    plot_run(result.rows, run_dir.root / "plots")
    final = result.rows[-1]
    run_dir.write_summary(
        {
            "final": {
                k: final.get(k)
                for k in (
                    "round",
                    "eval_loss",
                    "eval_accuracy",
                    "eval_perplexity",
                    "eval_exact_match",
                    "eval_rouge_l",
                    "fed_eval_loss",
                    "fed_eval_accuracy",
                    "fed_eval_exact_match",
                    "fed_eval_rouge_l",
                    "epsilon",
                )
            },
            "initial": {k: result.rows[0].get(k) for k in EVAL_FIELDS},
            "totals": {
                "rounds": cfg.federation.rounds,
                "bytes_up": sum(r.get("bytes_up", 0) for r in result.rows),
                "bytes_down": sum(r.get("bytes_down", 0) for r in result.rows),
                "dropped_replies": sum(
                    r.get("clients_dropped", 0) for r in result.rows
                ),
                "seconds": time.perf_counter() - started,
            },
            "adapter": {
                "path": str(adapter_dir) if adapter_dir else None,
                "parameters": num_params(result.state),
            },
            "privacy": {
                "mode": cfg.privacy.mode,
                "accountant": cfg.privacy.accountant,
                "delta": cfg.privacy.delta,
                "target_epsilon": cfg.privacy.epsilon or None,
                "max_grad_norm": cfg.privacy.max_grad_norm,
                "unit": "one training example of one client (sample-level DP)",
                "clients": strategy.privacy_summary(),
            },
            "seed": cfg.seed,
            "versions": versions(),
            "config": config_dict(cfg),
        }
    )
    log(INFO, "fedlora: the rounds:\n%s", format_table(result.rows))
    log(INFO, "%s %s", FINISHED_LOG, run_dir.root)  # the last line: all is written
