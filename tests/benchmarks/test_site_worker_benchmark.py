"""benchmarks/site_worker.py: the per-round split of metrics.jsonl rows."""

from __future__ import annotations

import pytest

from benchmarks.site_worker import job_overrides, split_rounds, steady


def test_a_round_splits_into_training_loading_evaluation_and_other() -> None:
    rows = [
        {"round": 0, "seconds": 0.5},
        {
            "round": 1,
            "seconds": 20.0,
            "client_train_seconds_max": 2.0,
            "client_startup_seconds_max": 6.0,
            "client_handler_seconds_max": 9.0,
            "eval_seconds": 1.5,
            "client_model_loads": 3,
        },
        {
            "round": 2,
            "seconds": 8.0,
            "client_train_seconds_max": 2.0,
            "client_startup_seconds_max": 1.0,
            "client_handler_seconds_max": 3.0,
            "eval_seconds": 1.0,
        },
    ]
    first, second = split_rounds(rows)
    # loading = startup + handler - training; other = the rest of the round
    assert first == {
        "round": 1,
        "seconds": 20.0,
        "training": 2.0,
        "loading": 13.0,
        "evaluation": 1.5,
        "other": 3.5,
        "model_loads": 3.0,
    }
    assert second["loading"] == 2.0 and second["other"] == pytest.approx(3.0)
    assert steady([first, second])["seconds"] == 8.0  # round 1 is left out


def test_every_mode_runs_the_same_job() -> None:
    job = job_overrides("minilm", 3, 5, 10)
    assert "federation.clients=3" in job and "federation.min_clients=3" in job
    assert "federation.rounds=5" in job and "federation.local_steps=10" in job
