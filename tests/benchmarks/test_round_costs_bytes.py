"""benchmarks.round_costs: the raw adapter size counts the run's transport dtype."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.round_costs import bytes_report

ROWS = [
    {"round": 0, "clients": 0, "bytes_down": 0, "bytes_up": 0},
    {
        "round": 1,
        "clients": 2,
        "clients_sampled": 2,
        "bytes_down": 4200,
        "bytes_up": 4400,
    },
]


def _summary(federation: dict[str, Any]) -> dict[str, Any]:
    return {"adapter": {"parameters": 1000}, "config": {"federation": federation}}


@pytest.mark.parametrize(
    ("federation", "dtype", "raw"),
    [
        ({"transport_dtype": "bfloat16"}, "bfloat16", 2000),
        ({"transport_dtype": "float32"}, "float32", 4000),
        ({}, "float32", 4000),  # a run from before the key existed
    ],
)
def test_raw_bytes_follow_the_transport_dtype(
    federation: dict[str, Any], dtype: str, raw: int
) -> None:
    report = bytes_report(ROWS, _summary(federation))
    assert (report["transport_dtype"], report["raw_adapter_bytes"]) == (dtype, raw)
    assert report["raw_float32_bytes"] == 4000
    assert report["mean_down"] == 2100 and report["overhead_ratio_up"] == 2200 / raw
