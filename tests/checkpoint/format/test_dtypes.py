"""checkpoint/format/dtypes.py: dtype codes and bit-exact array <-> TensorData conversions."""

from __future__ import annotations

import json
import struct
import warnings

import numpy as np
import pytest
import safetensors.torch
import torch
from tests.helpers.torch_dtypes import TORCH_DTYPES

from trainhooks.checkpoint.format import dtypes
from trainhooks.checkpoint.format.tensor import TensorData

NUMPY_DTYPES = ["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8", "c8", "c16"]
SHAPES = [(), (0,), (5,), (2, 3), (0, 4), (2, 1, 3)]


def _random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _random_numpy(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    dt = np.dtype(dtype)
    raw = _random_bytes(int(np.prod(shape)) * dt.itemsize)
    if dt.kind == "b":
        return (np.frombuffer(raw, np.uint8) % 2).astype(bool).reshape(shape)
    return np.frombuffer(raw, dt).reshape(shape).copy()


def _random_torch(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.from_numpy(_random_numpy("?", shape))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if not np.prod(shape):
        return torch.empty(shape, dtype=dtype)
    raw = np.frombuffer(_random_bytes(int(np.prod(shape)) * itemsize), np.uint8).copy()
    return torch.from_numpy(raw).view(dtype).reshape(shape).clone()


def _copied(data: TensorData) -> TensorData:
    """What a reader hands back: the same bytes in a read-only buffer of its own."""
    return TensorData(data.dtype, data.shape, memoryview(bytes(data.buffer)))


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_bytes = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


@pytest.fixture(autouse=True)
def _complex_half_is_experimental():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ComplexHalf support is experimental")
        yield


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_round_trip_is_bit_exact(dtype: str, shape: tuple[int, ...]) -> None:
    array = _random_numpy(dtype, shape)
    data = dtypes.numpy_to_tensor_data(array)
    assert data.buffer.nbytes == data.nbytes == array.nbytes
    target = np.zeros_like(array)
    dtypes.copy_into_numpy(target, _copied(data))
    assert target.tobytes() == array.tobytes()
    back = dtypes.tensor_data_to_numpy(_copied(data), array.dtype, array.shape)
    assert back.dtype == array.dtype and back.tobytes() == array.tobytes()


def test_complex128_is_stored_as_f64_pairs() -> None:
    array = np.array([1 + 2j, -0.0 - 3j], dtype=np.complex128)
    data = dtypes.numpy_to_tensor_data(array)
    assert (data.dtype, data.shape) == ("F64", (2, 2))
    assert dtypes.tensor_data_to_numpy(data, np.dtype("f8")).tolist() == [[1, 2], [-0.0, -3]]
    assert dtypes.storage_spec("C128", (2,)) == ("F64", (2, 2))
    assert dtypes.logical_itemsize("C128") == 16


def test_numpy_big_endian_and_strided_views_are_converted() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    data = dtypes.numpy_to_tensor_data(big)
    assert data.dtype == "I32"
    assert np.frombuffer(data.buffer, "<i4").tolist() == list(range(6))
    view = np.arange(12.0).reshape(3, 4)[:, ::2]
    data = dtypes.numpy_to_tensor_data(view)
    assert data.shape == (3, 2)
    assert np.frombuffer(data.buffer, "<f8").tolist() == view.ravel().tolist()
    # a big-endian target receives the little-endian bytes converted
    target = np.zeros(3, dtype=">f8")
    dtypes.copy_into_numpy(target, dtypes.numpy_to_tensor_data(np.array([1.5, -2.0, 3.25])))
    assert target.tolist() == [1.5, -2.0, 3.25]


def test_numpy_buffer_aliases_contiguous_arrays_unless_copy() -> None:
    array = np.arange(4, dtype=np.float32)
    shared = dtypes.numpy_to_tensor_data(array)
    copied = dtypes.numpy_to_tensor_data(array, copy=True)
    array[0] = 42.0
    assert np.frombuffer(shared.buffer, np.float32)[0] == 42.0
    assert np.frombuffer(copied.buffer, np.float32)[0] == 0.0


@pytest.mark.parametrize("dtype", ["O", "U3", "S2", "M8[s]", "m8[s]", "i4,f4", "g"])
def test_numpy_dtypes_without_a_byte_layout_are_refused(dtype: str) -> None:
    if dtype == "g" and np.dtype("g").itemsize == 8:
        pytest.skip("longdouble is double on this platform")
    with pytest.raises(TypeError, match="cannot be checkpointed: pass"):
        dtypes.numpy_to_tensor_data(np.zeros(2, dtype=dtype))


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    tensor = _random_torch(dtype, shape)
    data = dtypes.torch_to_tensor_data(tensor)
    code = dtypes.torch_dtype_code(dtype)
    assert (data.dtype, data.shape) == dtypes.storage_spec(code, shape)
    assert data.buffer.nbytes == data.nbytes == tensor.numel() * tensor.element_size()
    assert dtypes.torch_dtype(code) == dtype
    target = torch.empty(shape, dtype=dtype)
    if target.numel():
        target.reshape(-1).view(torch.uint8).zero_()  # zeros() lacks kernels for some dtypes
    dtypes.copy_into_torch(target, _copied(data))
    assert _same_bytes(target, tensor)
    assert _same_bytes(dtypes.tensor_data_to_torch(_copied(data), dtype, shape), tensor)


@pytest.mark.parametrize(
    "dtype",
    [d for d in TORCH_DTYPES if dtypes.torch_dtype_code(d) not in dtypes.EXTENDED_DTYPES],
    ids=str,
)
def test_codes_and_bytes_match_safetensors_own_writer(dtype: torch.dtype) -> None:
    tensor = _random_torch(dtype, (2, 3))
    try:
        blob = safetensors.torch.save({"x": tensor})
    except Exception as e:  # older safetensors without this dtype
        pytest.skip(f"safetensors cannot write {dtype}: {e}")
    (n,) = struct.unpack("<Q", blob[:8])
    entry = json.loads(blob[8 : 8 + n])["x"]
    start, end = entry["data_offsets"]
    data = dtypes.torch_to_tensor_data(tensor)
    assert entry["dtype"] == data.dtype
    assert blob[8 + n + start : 8 + n + end] == bytes(data.buffer)


def test_contiguous_cpu_tensor_buffer_aliases_its_memory() -> None:
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = dtypes.torch_to_tensor_data(tensor)
    assert np.frombuffer(data.buffer, np.uint8).ctypes.data == tensor.data_ptr()
    tensor[0, 0] = 7.0
    assert np.frombuffer(data.buffer, np.float32)[0] == 7.0
    snapshot = dtypes.torch_to_tensor_data(tensor, copy=True)
    tensor[0, 0] = 8.0
    assert np.frombuffer(snapshot.buffer, np.float32)[0] == 7.0


def test_torch_views_grad_and_conjugates_are_flattened_as_their_values() -> None:
    base = torch.arange(12.0).reshape(3, 4)
    view = base.t()[1:]  # non-contiguous
    data = dtypes.torch_to_tensor_data(view)
    assert data.shape == (3, 3)
    assert np.frombuffer(data.buffer, np.float32).tolist() == view.reshape(-1).tolist()
    param = torch.nn.Parameter(torch.ones(2))
    assert bytes(dtypes.torch_to_tensor_data(param).buffer) == torch.ones(2).numpy().tobytes()
    z = torch.tensor([1 + 2j], dtype=torch.complex64).conj()
    out = dtypes.tensor_data_to_torch(dtypes.torch_to_tensor_data(z), torch.complex64, (1,))
    assert out.tolist() == [1 - 2j]


def test_restore_into_parameter_views_and_read_only_buffers() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 3))
    source = dtypes.torch_to_tensor_data(torch.arange(6.0).reshape(2, 3))
    dtypes.copy_into_torch(param, _copied(source))  # bytes: a read-only buffer
    assert param.requires_grad and param.tolist() == [[0, 1, 2], [3, 4, 5]]
    base = torch.zeros(3, 2)
    dtypes.copy_into_torch(base.t(), _copied(source))  # a strided target
    assert base.t().tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantized_tensors_are_refused_with_what_to_pass() -> None:
    q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    with pytest.raises(
        TypeError, match=r"torch dtype torch.quint8 cannot be checkpointed.*dequantize"
    ):
        dtypes.torch_to_tensor_data(q)


def test_numpy_dtype_for_ml_dtypes_codes_needs_ml_dtypes() -> None:
    assert dtypes.numpy_dtype("C64") == np.complex64
    assert dtypes.numpy_dtype("BOOL") == np.bool_
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        with pytest.raises(TypeError, match="pip install ml_dtypes"):
            dtypes.numpy_dtype("BF16")
    else:
        assert dtypes.numpy_dtype("BF16").name == "bfloat16"
