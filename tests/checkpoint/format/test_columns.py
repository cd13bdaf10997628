"""``TensorColumns``: the flattened tensors as columns, and as a ``Mapping`` on demand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state.tree import flatten_state


def raw(value: Any) -> bytes:
    """The bytes a checkpoint stores for ``value`` (little-endian, C order)."""
    if isinstance(value, torch.Tensor):
        return value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    array = np.asarray(value)
    return np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()


def mixed_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """A state whose arrays take both flatten paths; returns it and name -> array."""
    base = np.arange(40, dtype=np.float32).reshape(5, 8)
    arrays: dict[str, Any] = {
        "dense": np.arange(6, dtype=np.float64).reshape(2, 3),
        "strided": base[::2, 1::3],
        "scalar0d": np.array(7, dtype=np.int16),
        "empty": np.zeros((3, 0, 2), dtype=np.float32),
        "flags": np.array([True, False, True]),
        "complex": np.array([1 + 2j, -3.5j], dtype=np.complex64),
        "big_endian": np.arange(4, dtype=">i4"),
        "torch": torch.arange(5, dtype=torch.bfloat16),
        "nested/inner": np.full(3, 9, dtype=np.uint8),
    }
    state = {k: v for k, v in arrays.items() if "/" not in k}
    state["nested"] = {"inner": arrays["nested/inner"]}
    return state, arrays


def test_columns_are_a_mapping_in_flatten_order() -> None:
    state, arrays = mixed_state()
    columns = flatten_state(state).tensors
    assert isinstance(columns, TensorColumns)
    assert len(columns) == len(arrays)
    assert list(columns) == list(arrays)  # depth first, in the state's order
    assert list(columns.keys()) == list(arrays)
    assert "nested/inner" in columns and "nested" not in columns and 3 not in columns
    assert dict(columns.items()).keys() == arrays.keys()


def test_looking_up_a_name_builds_tensor_data_matching_the_arrays_bytes() -> None:
    state, arrays = mixed_state()
    columns = flatten_state(state).tensors
    for name, value in arrays.items():
        data = columns[name]
        assert isinstance(data, TensorData)
        assert bytes(data.buffer) == raw(value), name
        assert data.buffer.nbytes == data.nbytes
        assert data.buffer.c_contiguous
    assert columns["dense"].dtype == "F64" and columns["dense"].shape == (2, 3)
    assert columns["strided"].shape == (3, 3) and columns["strided"].dtype == "F32"
    assert columns["scalar0d"].shape == () and columns["empty"].shape == (3, 0, 2)
    assert columns["flags"].dtype == "BOOL" and columns["complex"].dtype == "C64"
    assert columns["big_endian"].dtype == "I32" and columns["torch"].dtype == "BF16"


def test_a_contiguous_array_is_looked_up_without_a_copy() -> None:
    state, arrays = mixed_state()
    columns = flatten_state(state).tensors
    view = np.frombuffer(columns["dense"].buffer, np.uint8)
    assert np.shares_memory(view, arrays["dense"])
    arrays["dense"][0, 0] = 42.0  # the save reads the state as it is when written
    assert bytes(columns["dense"].buffer)[:8] == np.float64(42.0).tobytes()


def test_an_unknown_name_raises_key_error_naming_it() -> None:
    columns = flatten_state(mixed_state()[0]).tensors
    with pytest.raises(KeyError, match=r"no tensor 'no_such_tensor' among the \d+ tensors"):
        columns["no_such_tensor"]
    # A dict of the state, not a tensor: the message lists the tensors under it.
    with pytest.raises(KeyError, match=r"no tensor 'nested'.*same top-level entry: \['nested/"):
        columns["nested"]
    assert columns.get("no_such_tensor") is None


def test_gather_writes_every_source_back_to_back() -> None:
    state, arrays = mixed_state()
    columns = flatten_state(state).tensors
    order = list(range(len(columns)))[::-1]  # runs of one dtype broken up, strided ones too
    sizes = columns.nbytes()
    picked = [sizes[i] for i in order]
    out = np.full(sum(picked) + 16, 0xAB, dtype=np.uint8)
    written = columns.gather(order, picked, out)
    names = list(arrays)
    assert written == sum(picked)
    assert out[:written].tobytes() == b"".join(raw(arrays[names[i]]) for i in order)
    assert (out[written:] == 0xAB).all()  # nothing past the end


def test_nbytes_follow_dtype_and_shape() -> None:
    state, arrays = mixed_state()
    columns = flatten_state(state).tensors
    assert columns.nbytes() == [len(raw(a)) for a in arrays.values()]


def test_from_mapping_builds_columns_from_tensor_data() -> None:
    w = np.arange(3, dtype=np.float32)
    tensors = {"w": TensorData("F32", (3,), memoryview(w).cast("B"))}
    columns = TensorColumns.from_mapping(tensors)
    assert columns.names == ["w"] and columns.codes == ["F32"] and columns.shapes == [(3,)]
    assert bytes(columns["w"].buffer) == w.tobytes()
    assert TensorColumns.from_mapping(columns) is columns


def test_columns_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="2 names, 1 codes, 2 shapes and 2 sources"):
        TensorColumns(["a", "b"], ["F32"], [(1,), (1,)], [np.ones(1), np.ones(1)])


def test_joined_is_the_bytes_of_plain_contiguous_arrays_only() -> None:
    arrays = [
        np.arange(3, dtype=np.float32),
        np.array(7, dtype=np.int16),
        np.array([True, False]),
        np.zeros((2, 0), np.float64),
    ]
    cols = TensorColumns(
        [f"t{i}" for i in range(len(arrays))],
        ["F32", "I16", "BOOL", "F64"],
        [a.shape for a in arrays],
        list(arrays),
    )
    whole = b"".join(raw(a) for a in arrays)
    assert cols.joined(range(4), len(whole)) == whole
    assert cols.joined([2, 0], 14) == raw(arrays[2]) + raw(arrays[0])
    assert cols.joined(range(4), len(whole) + 1) is None  # not the size the plan says
    strided = TensorColumns(["s"], ["F32"], [(2,)], [np.arange(4, dtype=np.float32)[::2]])
    assert strided.joined(range(1), 8) is None
    data = TensorColumns(["d"], ["F32"], [(1,)], [TensorData("F32", (1,), memoryview(b"abcd"))])
    assert data.joined(range(1), 4) is None
