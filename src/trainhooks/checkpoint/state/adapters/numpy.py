"""NumPy arrays and NumPy scalars as state values.

Arrays are restored in place with ``np.copyto`` (so references stay valid); NumPy
scalars (``np.float32(0.5)``) are immutable and replaced in their container.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from trainhooks.checkpoint.format import dtypes
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData
from trainhooks.checkpoint.state.adapters.base import ArraySpec

__all__ = ["NumpyAdapter", "numpy_code"]

_CODES: dict[np.dtype[Any], str] = {}


def numpy_code(dtype: np.dtype[Any]) -> str:
    """``dtypes.numpy_dtype_code``, remembered per dtype."""
    code = _CODES.get(dtype)
    if code is None:
        code = _CODES[dtype] = dtypes.numpy_dtype_code(dtype)
    return code


class NumpyAdapter:
    """:class:`~trainhooks.checkpoint.state.adapters.base.ArrayAdapter` for ``np.ndarray`` and numeric NumPy scalars."""

    framework = "numpy"

    def owns(self, value: object) -> bool:
        if isinstance(value, np.ndarray):
            return True
        # np.str_ / np.bytes_ are str / bytes and go to the JSON tree.
        return isinstance(value, np.generic) and value.dtype.kind in "biufcV"

    def spec(self, value: Any) -> ArraySpec:
        if type(value) is np.ndarray:  # the common case, without the checks below
            return ArraySpec(numpy_code(value.dtype), value.shape)
        if isinstance(value, np.ma.MaskedArray):
            raise TypeError(
                "a NumPy masked array would lose its mask: pass its .data and "
                "np.ma.getmaskarray(...) as two arrays instead"
            )
        code = dtypes.numpy_dtype_code(value.dtype)
        return ArraySpec(
            code,
            tuple(int(n) for n in value.shape),
            scalar=value.ndim == 0 and isinstance(value, np.generic),
        )

    def to_tensor_data(self, value: Any, *, copy: bool) -> TensorData:
        if not copy and type(value) is np.ndarray and value.flags.c_contiguous:
            code = numpy_code(value.dtype)
            if code in DTYPE_ITEMSIZE and value.dtype.byteorder != ">" and value.ndim:
                try:  # zero-copy: the array's own memory, as bytes
                    return TensorData(code, value.shape, value.data.cast("B"))
                except (TypeError, ValueError):  # a dtype without a buffer format
                    pass
        return dtypes.numpy_to_tensor_data(np.asarray(value), copy=copy)

    def identity(self, value: Any) -> Hashable | None:
        # The same array object under two names; views are separate arrays (a NumPy
        # scalar is immutable, never tied).
        return id(value) if isinstance(value, np.ndarray) and value.nbytes else None

    def host_view(self, target: Any) -> np.ndarray[Any, Any] | None:
        if (
            type(target) is np.ndarray
            and target.flags.c_contiguous
            and target.flags.writeable
            and target.dtype.byteorder != ">"
            and numpy_code(target.dtype) in DTYPE_ITEMSIZE
        ):
            return target.reshape(-1).view(np.uint8)
        return None

    def writable_problem(self, value: Any) -> str | None:
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            return "is a read-only NumPy array and cannot be restored in place: pass array.copy()"
        return None

    def restore(self, target: Any, data: TensorData, spec: ArraySpec) -> Any:
        if isinstance(target, np.generic):
            return dtypes.tensor_data_to_numpy(data, target.dtype, ())[()]
        dtypes.copy_into_numpy(target, data)
        return target

    def build(self, data: TensorData, spec: ArraySpec) -> Any:
        array = dtypes.tensor_data_to_numpy(data, dtypes.numpy_dtype(spec.dtype), spec.shape)
        return array[()] if spec.scalar else array.copy()
