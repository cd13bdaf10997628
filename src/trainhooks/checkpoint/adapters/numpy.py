"""NumPy arrays and NumPy scalars as state values.

Arrays are restored in place with ``np.copyto`` (so references stay valid); NumPy
scalars (``np.float32(0.5)``) are immutable and replaced in their container.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trainhooks.checkpoint import dtypes
from trainhooks.checkpoint.adapters.base import ArraySpec
from trainhooks.checkpoint.tensor import TensorData

__all__ = ["NumpyAdapter"]


class NumpyAdapter:
    """:class:`~trainhooks.checkpoint.adapters.base.ArrayAdapter` for ``np.ndarray`` and numeric NumPy scalars."""

    framework = "numpy"

    def owns(self, value: object) -> bool:
        if isinstance(value, np.ndarray):
            return True
        # np.str_ / np.bytes_ are str / bytes and go to the JSON tree.
        return isinstance(value, np.generic) and value.dtype.kind in "biufcV"

    def spec(self, value: Any) -> ArraySpec:
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
        return dtypes.numpy_to_tensor_data(np.asarray(value), copy=copy)

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
