"""The message format: typed records survive Flower's records; keys live in one
module."""

from __future__ import annotations

import ast
from pathlib import Path

from flwr.app import MetricRecord

from fedlora import protocol as proto

ROOT = Path(__file__).resolve().parents[2]


def test_privacy_report_survives_a_metric_record() -> None:
    report = proto.PrivacyReport(
        epsilon=0.73,
        noise_multiplier=1.23,
        sample_rate=0.022,
        steps=41,
        delta=1e-5,
        exhausted=True,
        accountant="rdp",
    )
    values = proto.train_metrics(
        num_examples=11,
        loss=0.5,
        steps=3,
        seconds=0.1,
        bytes_down=10,
        bytes_up=5,
        partition_id=2,
        privacy=report,
    )
    back = proto.PrivacyReport.from_metrics(MetricRecord(values))
    # The accountant stays on the client; everything else travels.
    assert back == proto.PrivacyReport(**{**report.__dict__, "accountant": ""})
    assert values[proto.NUM_EXAMPLES] == 11


def test_a_reply_without_dp_has_no_privacy_report() -> None:
    values = proto.train_metrics(
        num_examples=4,
        loss=0.1,
        steps=1,
        seconds=0.0,
        bytes_down=0,
        bytes_up=0,
        partition_id=0,
    )
    assert proto.PrivacyReport.from_metrics(MetricRecord(values)) is None
    assert not any(k.startswith("dp-") or k == "epsilon" for k in values)


def test_evaluate_metrics_carry_only_the_metric_that_applies() -> None:
    cls = proto.evaluate_metrics(
        num_examples=3, loss=1.0, accuracy=0.5, perplexity=None
    )
    lm = proto.evaluate_metrics(num_examples=3, loss=1.0, accuracy=None, perplexity=2.7)
    assert proto.EVAL_ACCURACY in cls and proto.EVAL_PERPLEXITY not in cls
    assert proto.EVAL_PERPLEXITY in lm and proto.EVAL_ACCURACY not in lm


def _spelled_keys() -> dict[str, str]:
    """Message keys of the protocol that are specific enough to grep for."""
    return {
        name: value
        for name, value in vars(proto).items()
        if name.isupper() and isinstance(value, str) and ("-" in value or ":" in value)
    }


# Node-config keys of Flower / a SuperNode that share a spelling with a message key.
NODE_CONFIG = {
    ("fedlora/client/site.py", "partition-id"),
    ("fedlora/client/site.py", "he-budget"),
}


def test_message_keys_are_spelled_only_in_the_protocol_module() -> None:
    keys = set(_spelled_keys().values())
    stray = []
    for package in ("fedlora", "strategies", "simulations"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "fedlora/protocol.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                    continue
                for key in keys:
                    hit = node.value == key or (
                        key.endswith(":") and node.value.startswith(key)
                    )
                    if hit and (rel, key) not in NODE_CONFIG:
                        stray.append(f"{rel}:{node.lineno} {node.value!r}")
    assert stray == []
