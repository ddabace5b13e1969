"""One transport object per ArrayRecord: a deployed round's request count, cut.

Flower 1.41 moves a Message as a tree of objects, one per record and one per
``Array``, and every object is its own request: pushed by the sender, pulled by
the receiver, stored by the SuperLink, with the node authentication and database
work each request brings. A LoRA adapter is many small tensors (the tiny job's
train message is 22 objects; a 7B model's adapter with 4 target modules per layer
is hundreds), so on a deployment the SuperLink spent most of a round serving
these requests (py-spy, ``benchmarks/site_worker.py``).

``pack_content`` replaces each ArrayRecord of a message with a record holding one
``Array``: a header (key, dtype, shape, stype and size of every Array, JSON) and
the Arrays' bytes back to back. ``unpack_content`` restores the exact Arrays
(same bytes, same object ids). The server packs what it sends on a deployment;
a client replies packed exactly when the request was packed, so simulations,
older messages and other senders stay as they are.

Blob layout: 8-byte big-endian header length, header, data.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from flwr.app import Array, ArrayRecord, RecordDict

PACKED_KEY = "fedlora.packed"
PACKED_STYPE = "fedlora.packed/1"
_LENGTH = struct.Struct(">Q")


class PackingError(ValueError):
    """A packed record whose header and data disagree."""


def pack_arrays(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one Array (records of 0 or 1 Array are returned as they are)."""
    if len(record) <= 1:
        return record
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for key, array in record.items():
        entries.append(
            {
                "key": key,
                "dtype": array.dtype,
                "shape": list(array.shape),
                "stype": array.stype,
                "size": len(array.data),
            }
        )
        chunks.append(array.data)
    header = json.dumps(entries, separators=(",", ":")).encode()
    blob = b"".join([_LENGTH.pack(len(header)), header, *chunks])
    packed = Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)
    return ArrayRecord({PACKED_KEY: packed})


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is the output of :func:`pack_arrays`."""
    return list(record.keys()) == [PACKED_KEY] and (
        record[PACKED_KEY].stype == PACKED_STYPE
    )


def unpack_arrays(record: ArrayRecord) -> ArrayRecord:
    """Return the Arrays :func:`pack_arrays` packed; other records unchanged.

    Raises ``PackingError`` naming the problem when the blob is inconsistent.
    """
    if not is_packed(record):
        return record
    blob = record[PACKED_KEY].data
    if len(blob) < _LENGTH.size:
        raise PackingError(f"packed arrays: {len(blob)} bytes, shorter than a header")
    (size,) = _LENGTH.unpack_from(blob)
    start = _LENGTH.size + size
    try:
        entries = json.loads(blob[_LENGTH.size : start])
        total = sum(int(e["size"]) for e in entries)
    except (ValueError, KeyError, TypeError) as err:
        raise PackingError(f"packed arrays: unreadable header ({err})") from err
    if start + total != len(blob):
        raise PackingError(
            f"packed arrays: the header lists {total} bytes of data, the blob "
            f"holds {len(blob) - start}"
        )
    out = ArrayRecord()
    offset = start
    for entry in entries:
        end = offset + int(entry["size"])
        out[str(entry["key"])] = Array(
            dtype=str(entry["dtype"]),
            shape=tuple(int(x) for x in entry["shape"]),
            stype=str(entry["stype"]),
            data=blob[offset:end],
        )
        offset = end
    return out


def pack_content(content: RecordDict) -> RecordDict:
    """Return ``content`` with every ArrayRecord packed (other records shared)."""
    out = RecordDict()
    for key, record in content.items():
        out[key] = pack_arrays(record) if isinstance(record, ArrayRecord) else record
    return out


def content_is_packed(content: RecordDict) -> bool:
    """Whether any ArrayRecord of ``content`` is packed."""
    return any(is_packed(r) for r in content.array_records.values())


def unpack_content(content: RecordDict) -> RecordDict:
    """Return ``content`` with every packed ArrayRecord restored."""
    if not content_is_packed(content):
        return content
    out = RecordDict()
    for key, record in content.items():
        out[key] = unpack_arrays(record) if isinstance(record, ArrayRecord) else record
    return out
