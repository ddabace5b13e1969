"""Toy ServerApp: FedAvg over a tiny ArrayRecord, writes a JSON result."""

import json
import time
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for `num-server-rounds` rounds and dump metrics to `out-file`."""
    num_rounds = int(context.run_config["num-server-rounds"])
    if context.run_config.get("crash", False):
        raise ValueError("toy ServerApp asked to crash")
    out_file = str(context.run_config["out-file"])
    initial = ArrayRecord([np.zeros((2, 2), dtype=np.float32)])
    strategy = FedAvg(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=num_rounds)
    final = result.arrays.to_numpy_ndarrays()
    payload = {
        "rounds": sorted(int(r) for r in result.train_metrics_clientapp),
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {
            str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()
        },
        "final_mean": float(np.mean([a.mean() for a in final])),
    }
    if out_file:
        Path(out_file).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    log(INFO, "toy: finished")  # the app's last line (LocalSimulation.run)
    time.sleep(float(context.run_config.get("linger", 0.0)))
