"""The console filter on lines as a real run streams them (recorded from the default
job: Flower notices, Ray actor output, library warnings, the round table)."""

from __future__ import annotations

import io

from simulations.console import Console, keep, summary_line

ESC = "\x1b"
STREAM = [
    "[fedlora] SuperLink ready on 127.0.0.1:36595 in 2.4s",
    "Successfully started run 12546896484836724253",
    f"{ESC}[92mINFO {ESC}[0m:      Starting Flower Simulation",
    f"{ESC}[93mWARNING {ESC}[0m:   Since flwr 1.32, default simulated SuperNodes "
    "changed from 10 to 2.",
    f"{ESC}[92mINFO {ESC}[0m:      fedlora: writing the run directory to /tmp/run",
    f"{ESC}[93mWARNING {ESC}[0m:   fraction_evaluate is set to 0.0. Federated "
    "evaluation will be skipped.",
    "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray",
    "  warnings.warn(",
    "Loading weights:  20%|██        | 21/103 [00:00<00:00, 195.71it/s]",
    "classifier.weight | MISSING | ",
    f"{ESC}[92mINFO {ESC}[0m:      | round | eval loss | eval acc | clients | "
    "bytes up | bytes down | seconds |",
    f"{ESC}[92mINFO {ESC}[0m:      |------:|----------:|---------:|--------:|"
    "---------:|-----------:|--------:|",
    f"{ESC}[92mINFO {ESC}[0m:      |     0 |    1.3863 |   0.2328 |       0 |"
    "        0 |          0 |     3.3 |",
    f"{ESC}[92mINFO {ESC}[0m:      configure_train: Sampled 8 nodes (out of 8)",
    f"{ESC}[36m(ClientAppActor pid=7306){ESC}[0m Failed to load CPU gemm_4bit_forward",
    f"{ESC}[93mWARNING {ESC}[0m:   fedlora: round 1: dropping reply of node 3: "
    "tensor x has shape (4, 8), expected (8, 8)",
    f"{ESC}[92mINFO {ESC}[0m:      Round 1: aggregated 7 of 8 replies",
    f"{ESC}[92mINFO {ESC}[0m:      |     1 |    1.0788 |    1.1492 |   0.5040 |"
    "       7 |  319,918 |    319,728 |    74.9 |",
    f"{ESC}[91mERROR {ESC}[0m:     ServerApp thread raised an exception",
    f"{ESC}[92mINFO {ESC}[0m:      fedlora: finished; results in /tmp/run",
    "| round | eval loss |",
]


def test_the_console_keeps_the_table_our_warnings_and_errors_only() -> None:
    out = io.StringIO()
    console = Console(out=out)
    for line in STREAM:
        console(line)
    shown = out.getvalue().splitlines()
    assert shown == [
        "fedlora: writing the run directory to /tmp/run",
        "| round | eval loss | eval acc | clients | bytes up | bytes down | seconds |",
        "|------:|----------:|---------:|--------:|---------:|-----------:|--------:|",
        "|     0 |    1.3863 |   0.2328 |       0 |        0 |          0 |     3.3 |",
        "WARNING: round 1: dropping reply of node 3: tensor x has shape (4, 8), "
        "expected (8, 8)",
        "|     1 |    1.0788 |    1.1492 |   0.5040 |       7 |  319,918 |    319,728 |"
        "    74.9 |",
        "ERROR: ServerApp thread raised an exception",
    ]
    assert console.shown == len(shown)


def test_verbose_prints_every_line() -> None:
    out = io.StringIO()
    console = Console(verbose=True, out=out)
    for line in STREAM:
        console(line)
    assert len(out.getvalue().splitlines()) == len(STREAM)


def test_plain_lines_never_leak_ansi_codes() -> None:
    assert (
        keep(f"{ESC}[92mINFO {ESC}[0m:      |     2 |    0.5 |") == "|     2 |    0.5 |"
    )


def test_the_summary_names_rounds_time_metrics_and_outputs() -> None:
    rows = [
        {"round": 0, "eval_accuracy": 0.25, "eval_loss": 1.39, "seconds": 3.0},
        {"round": 1, "eval_accuracy": 0.9, "eval_loss": 0.3, "seconds": 30.5},
        {
            "round": 2,
            "eval_accuracy": 0.95,
            "eval_loss": 0.2,
            "epsilon": 0.734,
            "eval_perplexity": float("nan"),
            "seconds": 31.0,
        },
    ]
    line = summary_line(rows, "/tmp/run")
    assert line.startswith("fedlora: 2 rounds in 64 s; held-out accuracy 0.9500")
    assert "loss 0.2000" in line and "epsilon 0.734" in line
    assert "perplexity" not in line and "/tmp/run" in line
    assert "no round finished" in summary_line([], "/tmp/run")


def test_rows_printed_one_at_a_time_line_up_with_the_header() -> None:
    """Round 0 has no train loss; later rows do: the columns must not shift."""
    from strategies.server.table import format_table, run_columns

    rows = [
        {
            "round": 0,
            "eval_loss": 1.39,
            "eval_accuracy": 0.25,
            "clients": 0,
            "bytes_up": 0,
            "bytes_down": 0,
            "seconds": 1.4,
            "epsilon": None,
        },
        {
            "round": 1,
            "train_loss": 1.28,
            "eval_loss": 1.33,
            "eval_accuracy": 0.29,
            "clients": 3,
            "bytes_up": 922_241,
            "bytes_down": 921_960,
            "seconds": 29.7,
            "epsilon": 0.41,
        },
    ]
    for private in (False, True):
        columns = run_columns("classification", private)
        lines = format_table(rows[:1], columns).splitlines()
        lines.append(format_table(rows[1:], columns).splitlines()[-1])
        assert len({len(x) for x in lines}) == 1, "\n".join(lines)
        assert ("epsilon" in lines[0]) == private and "train loss" in lines[0]
