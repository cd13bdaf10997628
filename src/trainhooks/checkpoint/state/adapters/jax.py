"""JAX arrays as state values.

JAX arrays are immutable: a restore builds a new array with the target's sharding and
replaces the entry in its dict or list. ``jax`` is imported only when a JAX array is seen.

Typed key arrays (``jax.random.key(0)``, dtype ``key<fry>``) are saved as their
``jax.random.key_data`` (uint32) with the key's implementation recorded beside them
(``ArraySpec.key_impl``), and restored as typed keys of that implementation. Old-style
keys (``jax.random.PRNGKey(0)``) are plain uint32 arrays and stay so.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from typing import Any

import numpy as np

from trainhooks.checkpoint.format import dtypes
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state.adapters.base import ArraySpec

__all__ = ["JaxAdapter", "key_impl"]


def key_impl(value: Any) -> str | None:
    """The implementation of a typed JAX key array (``"threefry2x32"``), else None."""
    import jax

    if not jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        return None
    return str(jax.random.key_impl(value))


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
        impl = key_impl(value)
        if impl is not None:
            import jax

            data = jax.random.key_data(value)
            code = dtypes.numpy_dtype_code(np.dtype(data.dtype))
            return ArraySpec(code, tuple(int(n) for n in data.shape), key_impl=impl)
        code = dtypes.numpy_dtype_code(np.dtype(value.dtype))
        return ArraySpec(code, tuple(int(n) for n in value.shape))

    def to_tensor_data(self, value: Any, *, copy: bool) -> TensorData:
        if key_impl(value) is not None:
            import jax

            value = jax.random.key_data(value)
        return dtypes.numpy_to_tensor_data(np.asarray(value), copy=copy)

    def identity(self, value: Any) -> Hashable | None:
        return None  # immutable: every name gets an array of its own on restore

    def writable_problem(self, value: Any) -> str | None:
        return None

    def restore(self, target: Any, data: TensorData, spec: ArraySpec) -> Any:
        import jax

        # A copy: device_put may alias host memory on the CPU backend.
        if spec.key_impl is not None:
            host = dtypes.tensor_data_to_numpy(data, dtypes.numpy_dtype(spec.dtype), spec.shape)
            key = jax.random.wrap_key_data(host.copy(), impl=spec.key_impl)
            return jax.device_put(key, target.sharding)
        host = dtypes.tensor_data_to_numpy(data, np.dtype(target.dtype), spec.shape).copy()
        return jax.device_put(host, target.sharding)

    def host_view(self, target: Any) -> np.ndarray[Any, Any] | None:
        return None  # immutable: restored by replacement

    def build(self, data: TensorData, spec: ArraySpec) -> Any:
        import jax.numpy as jnp

        host = dtypes.tensor_data_to_numpy(data, dtypes.numpy_dtype(spec.dtype), spec.shape)
        if spec.key_impl is not None:
            import jax

            return jax.random.wrap_key_data(jnp.array(host), impl=spec.key_impl)
        return jnp.array(host)
