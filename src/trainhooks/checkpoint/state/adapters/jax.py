"""JAX arrays as state values.

JAX arrays are immutable: a restore builds a new array with the target's sharding and
replaces the entry in its dict or list. ``jax`` is imported only when a JAX array is seen.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from trainhooks.checkpoint.format import dtypes
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state.adapters.base import ArraySpec

__all__ = ["JaxAdapter"]


class JaxAdapter:
    """:class:`~trainhooks.checkpoint.state.adapters.base.ArrayAdapter` for ``jax.Array``."""

    framework = "jax"

    def owns(self, value: object) -> bool:
        jax = sys.modules.get("jax")
        return jax is not None and isinstance(value, jax.Array)

    def spec(self, value: Any) -> ArraySpec:
        if not value.is_fully_addressable:
            raise TypeError(
                "a JAX array sharded across processes cannot be saved by one process: "
                "pass each process's addressable shards as separate arrays"
            )
        code = dtypes.numpy_dtype_code(np.dtype(value.dtype))
        return ArraySpec(code, tuple(int(n) for n in value.shape))

    def to_tensor_data(self, value: Any, *, copy: bool) -> TensorData:
        return dtypes.numpy_to_tensor_data(np.asarray(value), copy=copy)

    def writable_problem(self, value: Any) -> str | None:
        return None

    def restore(self, target: Any, data: TensorData, spec: ArraySpec) -> Any:
        import jax

        # A copy: device_put may alias host memory on the CPU backend.
        host = dtypes.tensor_data_to_numpy(data, np.dtype(target.dtype), spec.shape).copy()
        return jax.device_put(host, target.sharding)

    def host_view(self, target: Any) -> np.ndarray[Any, Any] | None:
        return None  # immutable: restored by replacement

    def build(self, data: TensorData, spec: ArraySpec) -> Any:
        import jax.numpy as jnp

        host = dtypes.tensor_data_to_numpy(data, dtypes.numpy_dtype(spec.dtype), spec.shape)
        return jnp.array(host)
