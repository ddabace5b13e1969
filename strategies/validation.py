"""Validate client replies before any arithmetic.

``reply_problem`` returns None for a good reply or a reason string naming what was
expected and what was found; the strategy logs the reason and drops that reply while
the round goes on with the others.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora import protocol as proto

# A reply may be somewhat larger than its raw tensors (keys, numpy headers); anything
# beyond this factor of the expected size is refused before it is deserialised.
SIZE_SLACK = 1.5
ALLOWED_DTYPES = ("float32",)


def expected_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Raw float32 bytes of tensors with these shapes."""
    return sum(4 * int(np.prod(s)) for s in shapes.values())


def reply_problem(
    msg: Message,
    expected: Mapping[str, tuple[int, ...]],
    *,
    weight_key: str = proto.NUM_EXAMPLES,
) -> str | None:
    """Why ``msg`` cannot be aggregated, or None if it can.

    Parameters
    ----------
    msg : Message
        A training reply.
    expected : Mapping[str, tuple[int, ...]]
        Adapter key -> shape the server expects from this client this round.
    weight_key : str (default: "num-examples")
        MetricRecord key holding the aggregation weight.
    """
    if msg.has_error():
        return f"client reported an error: {msg.error.reason}"
    content = msg.content
    arrays = content.get(proto.ARRAYS)
    metrics = content.get(proto.METRICS)
    if not isinstance(arrays, ArrayRecord):
        return "reply has no ArrayRecord 'arrays'"
    if not isinstance(metrics, MetricRecord):
        return "reply has no MetricRecord 'metrics'"
    weight = metrics.get(weight_key)
    if not isinstance(weight, (int, float)) or not weight > 0:
        return f"metric {weight_key!r} must be a positive number, got {weight!r}"
    limit = int(SIZE_SLACK * expected_bytes(expected)) + 64 * len(expected) + 1024
    if arrays.count_bytes() > limit:
        return f"reply is {arrays.count_bytes()} bytes, more than the {limit} allowed"
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return (
            f"wrong keys: missing {missing[:3]} ({len(missing)} in all), "
            f"unexpected {extra[:3]} ({len(extra)} in all)"
        )
    return _tensor_problem(arrays, expected)


def _tensor_problem(
    arrays: ArrayRecord, expected: Mapping[str, tuple[int, ...]]
) -> str | None:
    for key, shape in expected.items():
        arr = arrays[key]
        if arr.dtype not in ALLOWED_DTYPES:
            return f"{key}: dtype {arr.dtype}, expected one of {ALLOWED_DTYPES}"
        if tuple(arr.shape) != tuple(shape):
            return f"{key}: shape {tuple(arr.shape)}, expected {tuple(shape)}"
        if not np.isfinite(arr.numpy()).all():
            return f"{key}: contains NaN or Inf"
    return None
