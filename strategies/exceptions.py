"""Project exceptions of the server side; each carries a human-readable ``reason``."""

from __future__ import annotations


class FedLoraServerError(Exception):
    """Base class: ``reason`` says what was expected, what was found, what happens."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AggregationError(FedLoraServerError):
    """Aggregation cannot proceed (e.g. no valid reply, weights summing to zero)."""
