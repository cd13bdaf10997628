"""Dtype codes and the byte-level conversions between arrays and ``TensorData``.

A checkpoint stores every array under a safetensors dtype code (``"F32"``, ``"BF16"``,
...). A few dtypes that NumPy or PyTorch have lack a safetensors code; they are stored
under a code that has the same bytes and recorded in the tree under an *extended* code:

=================  ==============  =====================================
logical code       stored as       why
=================  ==============  =====================================
``C128``           ``F64`` [..,2]  complex128: real and imaginary parts
``C32``            ``F16`` [..,2]  torch.complex32 (chalf)
``F8_E4M3FNUZ``    ``U8``          torch.float8_e4m3fnuz, raw bytes
``F8_E5M2FNUZ``    ``U8``          torch.float8_e5m2fnuz, raw bytes
``F4_E2M1FN_X2``   ``U8``          torch.float4_e2m1fn_x2, raw bytes
=================  ==============  =====================================

All conversions work on raw bytes, so every value (NaN payloads, negative zero,
subnormals) round-trips bit-exactly. Checkpoints are little-endian, like safetensors.

Lifetime caveat: :func:`numpy_to_tensor_data` and :func:`torch_to_tensor_data` return a
buffer that *aliases* the array's memory whenever the array is C-contiguous, little-endian
and in host memory (no copy). Such a buffer is only valid while the array is unchanged:
write it out before the next training step changes the array, or pass ``copy=True``.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "EXTENDED_DTYPES",
    "copy_into_numpy",
    "copy_into_torch",
    "host_bytes",
    "logical_itemsize",
    "numpy_dtype",
    "numpy_dtype_code",
    "numpy_to_tensor_data",
    "storage_spec",
    "tensor_data_to_numpy",
    "tensor_data_to_torch",
    "torch_dtype",
    "torch_dtype_code",
    "torch_to_tensor_data",
]

if sys.byteorder != "little":  # pragma: no cover - every platform torch supports
    raise ImportError("trainhooks checkpoints need a little-endian host.")

#: extended code -> (storage code, trailing dimension added for storage or 0).
EXTENDED_DTYPES: dict[str, tuple[str, int]] = {
    "C128": ("F64", 2),
    "C32": ("F16", 2),
    "F8_E4M3FNUZ": ("U8", 0),
    "F8_E5M2FNUZ": ("U8", 0),
    "F4_E2M1FN_X2": ("U8", 0),
}

# NumPy dtypes by (kind, itemsize); ml_dtypes' extension types (kind "V") by name.
_NUMPY_CODES: dict[tuple[str, int], str] = {
    ("b", 1): "BOOL",
    ("u", 1): "U8",
    ("u", 2): "U16",
    ("u", 4): "U32",
    ("u", 8): "U64",
    ("i", 1): "I8",
    ("i", 2): "I16",
    ("i", 4): "I32",
    ("i", 8): "I64",
    ("f", 2): "F16",
    ("f", 4): "F32",
    ("f", 8): "F64",
    ("c", 8): "C64",
    ("c", 16): "C128",
}
_ML_DTYPES_CODES: dict[str, str] = {
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}

# torch dtype attribute name -> code; looked up with getattr because older torch
# versions lack some of them.
_TORCH_NAMES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex32": "C32",
    "complex64": "C64",
    "complex128": "C128",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "float4_e2m1fn_x2": "F4_E2M1FN_X2",
}


def storage_spec(dtype: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The safetensors code and shape an array of logical ``dtype`` and ``shape`` is stored as.

    Example:
        >>> storage_spec("C128", (3,))
        ('F64', (3, 2))
    """
    if dtype in DTYPE_ITEMSIZE:
        return dtype, shape
    try:
        code, trailing = EXTENDED_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"Unknown dtype code {dtype!r}.") from None
    return code, (*shape, trailing) if trailing else shape


def logical_itemsize(dtype: str) -> int:
    """Bytes per element of logical ``dtype`` (a safetensors or extended code)."""
    code, trailing = EXTENDED_DTYPES.get(dtype, (dtype, 0))
    return DTYPE_ITEMSIZE[code] * max(trailing, 1)


# --- NumPy -----------------------------------------------------------------------------


def numpy_dtype_code(dtype: np.dtype[Any]) -> str:
    """The logical code of NumPy ``dtype`` (either byte order).

    Raises:
      TypeError: the dtype has no fixed-size numeric layout (object, str, datetime,
        structured, longdouble).

    Example:
        >>> numpy_dtype_code(np.dtype(">f4"))
        'F32'
    """
    dtype = np.dtype(dtype)
    # ml_dtypes gives most of its types the kind "V", but float8_e5m2 the kind "f":
    # look them up by name whatever the kind (NumPy's own floats have other names).
    if dtype.names is None and dtype.name in _ML_DTYPES_CODES:
        return _ML_DTYPES_CODES[dtype.name]
    code = _NUMPY_CODES.get((dtype.kind, dtype.itemsize))
    if code is None:
        raise TypeError(
            f"NumPy dtype {dtype} cannot be checkpointed: pass an array of a bool, integer, "
            "float16/32/64, complex64/128 or ml_dtypes (bfloat16, float8) dtype instead."
        )
    return code


def numpy_dtype(code: str) -> np.dtype[Any]:
    """The NumPy dtype for logical ``code``; BF16 and F8 codes need the ml_dtypes package.

    Example:
        >>> numpy_dtype("C128")
        dtype('complex128')
    """
    for (kind, size), c in _NUMPY_CODES.items():
        if c == code:
            return np.dtype(f"<{kind}{size}") if kind != "b" else np.dtype(bool)
    for name, c in _ML_DTYPES_CODES.items():
        if c == code:
            try:
                import ml_dtypes
            except ImportError:
                raise TypeError(
                    f"Dtype {code} has no NumPy equivalent without the ml_dtypes package: "
                    "pip install ml_dtypes, or restore into a torch tensor."
                ) from None
            return np.dtype(getattr(ml_dtypes, name))
    raise TypeError(f"Dtype {code} has no NumPy equivalent; restore into a torch tensor instead.")


def _little_endian(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype


def numpy_to_tensor_data(array: np.ndarray[Any, Any], *, copy: bool = False) -> TensorData:
    """``array`` as ``TensorData``: an alias of its memory when C-contiguous and little-endian.

    Non-contiguous views are gathered into a contiguous copy and big-endian arrays
    converted; ``copy=True`` guarantees the buffer never aliases ``array``.

    Example:
        >>> numpy_to_tensor_data(np.arange(3, dtype=np.int16)).buffer.tobytes()
        b'\\x00\\x00\\x01\\x00\\x02\\x00'
    """
    code = numpy_dtype_code(array.dtype)
    shape = tuple(int(n) for n in array.shape)
    contiguous = np.ascontiguousarray(array, dtype=_little_endian(array.dtype))
    if copy and np.may_share_memory(contiguous, array):
        contiguous = contiguous.copy()
    storage, storage_shape = storage_spec(code, shape)
    return TensorData(storage, storage_shape, contiguous.reshape(-1).view(np.uint8).data)


def tensor_data_to_numpy(
    data: TensorData, dtype: np.dtype[Any] | None = None, shape: tuple[int, ...] | None = None
) -> np.ndarray[Any, Any]:
    """A read-only NumPy view of ``data``'s bytes, as ``dtype`` (default: from the code) and ``shape``.

    Pass the logical ``shape`` for extended codes (for C128 the stored shape has a
    trailing 2). The view aliases ``data.buffer``: copy it to keep it.

    Example:
        >>> tensor_data_to_numpy(TensorData("I16", (2,), memoryview(b"\\x01\\x00\\x02\\x00")))
        array([1, 2], dtype=int16)
    """
    if dtype is None:
        dtype = numpy_dtype(data.dtype)
    if shape is None:
        shape = data.shape
    flat = np.frombuffer(data.buffer, dtype=np.uint8)
    return flat.view(_little_endian(np.dtype(dtype))).reshape(shape)


def copy_into_numpy(target: np.ndarray[Any, Any], data: TensorData) -> None:
    """Copy ``data``'s bytes into ``target`` in place (``target`` keeps its identity).

    ``data`` must hold exactly ``target.nbytes`` bytes of ``target``'s dtype (any byte
    order; they are converted).
    """
    np.copyto(target, tensor_data_to_numpy(data, target.dtype, target.shape), casting="equiv")


# --- PyTorch ---------------------------------------------------------------------------


@functools.cache
def _torch_codes() -> dict[Any, str]:
    import torch

    return {getattr(torch, n): c for n, c in _TORCH_NAMES.items() if hasattr(torch, n)}


def torch_dtype_code(dtype: torch.dtype) -> str:
    """The logical code of torch ``dtype``.

    Raises:
      TypeError: quantized and sub-byte dtypes, which have no byte layout to store.

    Example:
        >>> import torch
        >>> torch_dtype_code(torch.bfloat16)
        'BF16'
    """
    code = _torch_codes().get(dtype)
    if code is None:
        raise TypeError(
            f"torch dtype {dtype} cannot be checkpointed: pass a tensor of a bool, integer, "
            "floating, complex or float8 dtype instead (dequantize quantized tensors)."
        )
    return code


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype for logical ``code``."""
    for dtype, c in _torch_codes().items():
        if c == code:
            return dtype
    raise TypeError(f"Dtype {code} has no torch equivalent in this torch version.")


def host_bytes(tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """A uint8 NumPy view of a contiguous CPU tensor's memory (no copy).

    Example:
        >>> import torch
        >>> host_bytes(torch.ones(1, dtype=torch.int16)).tolist()
        [1, 0]
    """
    import torch

    if not tensor.numel():  # an empty tensor may have any strides; it has no bytes anyway
        return np.empty(0, dtype=np.uint8)
    return tensor.detach().reshape(-1).view(torch.uint8).numpy()


def torch_to_tensor_data(tensor: torch.Tensor, *, copy: bool = False) -> TensorData:
    """``tensor`` as ``TensorData``: an alias of its memory when a contiguous CPU tensor.

    Tensors on an accelerator are copied to host memory, non-contiguous views gathered
    into a contiguous copy; ``copy=True`` guarantees the buffer never aliases ``tensor``.

    Example:
        >>> import torch
        >>> torch_to_tensor_data(torch.ones(2, 3)).shape
        (2, 3)
    """
    code = torch_dtype_code(tensor.dtype)
    shape = tuple(int(n) for n in tensor.shape)
    host = tensor.detach()
    aliases = host.device.type == "cpu"
    if not aliases:
        host = host.cpu()
    host = host.resolve_conj().resolve_neg().contiguous()
    if copy and aliases and host.data_ptr() == tensor.data_ptr() and host.numel():
        host = host.clone()
    storage, storage_shape = storage_spec(code, shape)
    return TensorData(storage, storage_shape, host_bytes(host).data)


def tensor_data_to_torch(
    data: TensorData, dtype: torch.dtype, shape: tuple[int, ...], device: Any = "cpu"
) -> torch.Tensor:
    """A new tensor (owning its memory) with ``data``'s bytes as ``dtype`` and logical ``shape``.

    Example:
        >>> import torch
        >>> data = torch_to_tensor_data(torch.arange(4.0))
        >>> tensor_data_to_torch(data, torch.float32, (2, 2))
        tensor([[0., 1.],
                [2., 3.]])
    """
    import torch

    out = torch.empty(shape, dtype=dtype)
    host_bytes(out)[:] = np.frombuffer(data.buffer, dtype=np.uint8)
    return out if torch.device(device).type == "cpu" else out.to(device)


def copy_into_torch(target: torch.Tensor, data: TensorData) -> None:
    """Copy ``data``'s bytes into ``target`` in place, without autograd errors.

    A contiguous CPU target is written directly; any other (accelerator, strided view,
    conjugate view) goes through a host tensor and ``target.copy_`` under
    ``torch.no_grad()``. Parameters that require grad keep their identity and flag.
    """
    import torch

    direct = (
        target.device.type == "cpu"
        and target.is_contiguous()
        and not target.is_conj()
        and not target.is_neg()
    )
    if direct:
        host_bytes(target)[:] = np.frombuffer(data.buffer, dtype=np.uint8)
        return
    staged = tensor_data_to_torch(data, target.dtype, tuple(target.shape))
    with torch.no_grad():
        target.copy_(staged)
