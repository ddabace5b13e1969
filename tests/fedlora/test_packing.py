"""Packed ArrayRecords: exact round trip (bytes and object ids), one object on the
wire, clear errors for a damaged blob, and the request/reply rule of the
ClientApp (a reply is packed exactly when its request was)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message import make_message
from flwr.common import Metadata

from fedlora import packing
from fedlora.client.app import pack_reply, unpack_request
from fedlora.lora.state import decode_array, encode_array


def adapter_record() -> ArrayRecord:
    """Unequal shapes and dtypes, bf16 included, and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return ArrayRecord(
        {
            "layer.0.lora_A": Array(torch.randn(4, 16, generator=g)),
            "layer.0.lora_B": encode_array(
                "b", torch.randn(16, 4, generator=g), "bfloat16"
            ),
            "layer.1.lora_A": Array(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
            "scale": Array(np.array(2.5, dtype=np.float32)),
            "empty": Array(np.zeros((0, 3), dtype=np.float16)),
        }
    )


def test_round_trip_restores_every_array_exactly() -> None:
    record = adapter_record()
    packed = packing.pack_arrays(record)
    assert list(packed.keys()) == [packing.PACKED_KEY] and packing.is_packed(packed)
    back = packing.unpack_arrays(packed)
    assert list(back.keys()) == list(record.keys())
    for key, array in record.items():
        got = back[key]
        assert (got.dtype, got.shape, got.stype) == (
            array.dtype,
            array.shape,
            array.stype,
        )
        assert got.data == array.data and got.object_id == array.object_id
    assert torch.equal(
        decode_array(back["layer.0.lora_B"]), decode_array(record["layer.0.lora_B"])
    )


def test_a_message_of_n_arrays_travels_as_one_array_object() -> None:
    content = RecordDict(
        {"arrays": adapter_record(), "config": ConfigRecord({"lr": 0.1})}
    )
    packed = packing.pack_content(content)
    assert packing.content_is_packed(packed)
    assert len(packed.array_records["arrays"]) == 1
    assert packed.config_records["config"] is content.config_records["config"]
    restored = packing.unpack_content(packed)
    assert restored.array_records["arrays"].object_id == (
        content.array_records["arrays"].object_id
    )


def test_records_of_at_most_one_array_and_plain_content_stay_as_they_are() -> None:
    single = ArrayRecord({"w": Array(np.ones(3, dtype=np.float32))})
    assert packing.pack_arrays(single) is single
    assert packing.pack_arrays(ArrayRecord()) is not None
    plain = RecordDict({"m": MetricRecord({"x": 1.0})})
    assert not packing.content_is_packed(plain)
    assert packing.unpack_content(plain) is plain


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: b[:4], "shorter than a header"),
        (lambda b: b[:-1], "holds"),
        (lambda b: b + b"x", "holds"),
        (lambda b: b[:8] + b"{" + b[9:], "unreadable header"),
    ],
)
def test_a_damaged_blob_is_refused_with_the_reason(damage, match) -> None:  # type: ignore[no-untyped-def]
    blob = packing.pack_arrays(adapter_record())[packing.PACKED_KEY].data
    bad = damage(blob)
    record = ArrayRecord(
        {
            packing.PACKED_KEY: Array(
                dtype="uint8", shape=(len(bad),), stype=packing.PACKED_STYPE, data=bad
            )
        }
    )
    with pytest.raises(packing.PackingError, match=match):
        packing.unpack_arrays(record)


def _request(content: RecordDict) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    return make_message(metadata=metadata, content=content)


@pytest.mark.parametrize("packed", [True, False])
def test_the_client_replies_packed_exactly_when_the_request_was(packed: bool) -> None:
    content = RecordDict({"arrays": adapter_record()})
    sent = packing.pack_content(content) if packed else content
    msg = _request(sent)
    assert unpack_request(msg) is packed
    # the handler sees plain arrays either way
    assert list(msg.content.array_records["arrays"].keys()) == list(
        content.array_records["arrays"].keys()
    )
    reply = Message(RecordDict({"arrays": adapter_record()}), reply_to=msg)
    reply = pack_reply(reply, packed)
    assert packing.content_is_packed(reply.content) is packed
