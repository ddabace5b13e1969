"""Validate client replies before any arithmetic.

``reply_problem`` returns None for a good reply or a reason string naming what was
expected and what was found; the strategy logs the reason and drops that reply while
the round goes on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora import protocol as proto
from fedlora.lora.state import decode_array

# A reply may be somewhat larger than its raw tensors (keys, numpy headers); anything
# beyond this factor of the expected size is refused before it is deserialised.
SIZE_SLACK = 1.5


def expected_bytes(
    shapes: Mapping[str, tuple[int, ...]], dtype: str = "float32"
) -> int:
    """Raw bytes of tensors with these shapes in the wire ``dtype``."""
    return sum(proto.TRANSPORT_DTYPES[dtype] * math.prod(s) for s in shapes.values())


def reply_problem(
    msg: Message,
    expected: Mapping[str, tuple[int, ...]],
    *,
    weight_key: str = proto.NUM_EXAMPLES,
    dtype: str = "float32",
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
    dtype : str (default: "float32")
        The run's ``federation.transport_dtype``: the only element type accepted
        (checked on the metadata, before the size check and any decoding).
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
    wrong_dtype = _dtype_problem(arrays, dtype)
    if wrong_dtype is not None:
        return wrong_dtype
    limit = int(SIZE_SLACK * expected_bytes(expected, dtype)) + 64 * len(expected)
    limit += 1024
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


def _dtype_problem(arrays: ArrayRecord, dtype: str) -> str | None:
    """Name the first tensor whose element type is not the transport dtype."""
    for key, arr in arrays.items():
        if arr.dtype != dtype:
            return (
                f"{key}: dtype {arr.dtype}, but federation.transport_dtype is "
                f"{dtype!r}; only {dtype} is accepted"
            )
    return None


def _tensor_problem(
    arrays: ArrayRecord, expected: Mapping[str, tuple[int, ...]]
) -> str | None:
    for key, shape in expected.items():
        arr = arrays[key]
        if tuple(arr.shape) != tuple(shape):
            return f"{key}: shape {tuple(arr.shape)}, expected {tuple(shape)}"
        try:
            values = decode_array(arr)
        except (TypeError, ValueError, EOFError, OSError) as err:
            return f"{key}: unreadable {arr.dtype} payload: {err}"
        if not torch.isfinite(values).all():
            return f"{key}: contains NaN or Inf"
    return None
