"""Adapter tensors on the wire in federation.transport_dtype: exact torch rounding.

The reference is torch's own cast, ``t.to(dtype).to(float32)``, compared bit for bit
(so -0.0, inf and NaN count), after the record went through Flower's protobuf
serialisation as it does between ServerApp and ClientApp.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedlora import protocol as proto
from fedlora.config import FederationConfig
from fedlora.config.flat import ConfigError
from fedlora.lora.state import decode_array, from_record, to_record

WIDE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _state() -> dict[str, torch.Tensor]:
    """Values across magnitudes, exact ties, signed zero, inf and NaN."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(-9, 4, 14).repeat_interleave(32).reshape(14, 32)
    special = torch.tensor(
        [
            1 + 2**-8,  # bf16 tie: rounds to even (1.0)
            1 + 3 * 2**-8,  # bf16 tie: rounds to even (1 + 2**-6)
            1 + 2**-11,  # float16 tie
            -0.0,
            float("inf"),
            float("-inf"),
            float("nan"),
            3e-39,  # float32 subnormal
        ]
    )
    return {
        "m.lora_A.weight": torch.randn(14, 32, generator=g) * scales,
        "m.lora_B.weight": torch.randn(32, 4, generator=g) * 1e-3,
        "m.special": special,
        "m.scalar": torch.tensor(0.1),
    }


def _over_the_wire(record: ArrayRecord) -> ArrayRecord:
    content = recorddict_from_proto(recorddict_to_proto(RecordDict({"a": record})))
    return content.array_records["a"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decoded_values_equal_torch_rounding_bit_for_bit(dtype: str) -> None:
    state = _state()
    record = _over_the_wire(to_record(state, dtype))
    back = from_record(record)
    assert set(back) == set(state)
    for key, tensor in state.items():
        want = tensor.to(WIDE[dtype]).to(torch.float32)
        assert back[key].dtype == torch.float32 and back[key].shape == tensor.shape
        assert torch.equal(_bits(back[key]), _bits(want)), key
        assert record[key].dtype == dtype
    if dtype != "float32":  # the values really were rounded
        a = state["m.lora_A.weight"]
        assert not torch.equal(back["m.lora_A.weight"], a)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16bit_payload_is_two_bytes_per_value_and_no_header(dtype: str) -> None:
    state = _state()
    record = to_record(state, dtype)
    for key, tensor in state.items():
        assert record[key].stype == proto.RAW_STYPE
        assert len(record[key].data) == 2 * tensor.numel()
        with pytest.raises(TypeError, match="Unsupported serialization type"):
            record[key].numpy()  # a plain Flower reader refuses, it cannot misread
    wide = to_record(state)
    assert record.count_bytes() <= 0.5 * wide.count_bytes()


def test_float32_is_flowers_own_array_byte_for_byte() -> None:
    state = _state()
    ours, flowers = to_record(state), ArrayRecord(state)
    for key in state:
        assert ours[key].stype == flowers[key].stype == "numpy.ndarray"
        assert ours[key].data == flowers[key].data


def test_float16_overflow_is_refused_naming_the_key_and_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"m\.big: a value overflows float16.*bfloat16"
    ):
        to_record({"m.big": torch.tensor([1.0, 7e4])}, "float16")
    assert torch.equal(  # bfloat16 has float32's range
        from_record(to_record({"m.big": torch.tensor([7e4])}, "bfloat16"))["m.big"],
        torch.tensor([7e4]).to(torch.bfloat16).float(),
    )


def test_a_payload_that_does_not_match_its_shape_is_refused() -> None:
    record = to_record({"m.x": torch.ones(4, 4)}, "bfloat16")
    array = record["m.x"]
    array.data = array.data[:-2]
    with pytest.raises(ValueError, match=r"30 bytes for shape \(4, 4\) in bfloat16"):
        decode_array(array)
    lying = to_record({"m.x": torch.ones(4, 4)})["m.x"]
    lying.dtype = "bfloat16"  # numpy payload that claims another dtype
    with pytest.raises(ValueError, match="payload is float32"):
        decode_array(lying)


def test_transport_dtype_is_validated_with_the_allowed_values() -> None:
    assert FederationConfig().transport_dtype == "float32"
    with pytest.raises(ConfigError, match="federation.transport_dtype='int8'") as err:
        FederationConfig(transport_dtype="int8")
    assert "['bfloat16', 'float16', 'float32']" in str(err.value)
