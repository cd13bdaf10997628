"""The two adapter Protocols and the array description they share."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple, Protocol

import numpy as np

from trainhooks.checkpoint.format.tensor import TensorData

__all__ = ["ArrayAdapter", "ArraySpec", "StatefulAdapter"]


class ArraySpec(NamedTuple):
    """An array as the tree records it.

    ``dtype`` is the logical code (see ``dtypes.py``), ``device`` where a rebuilt array
    should live (None: the framework's default), ``scalar`` True for a NumPy scalar
    (``np.float32(1.0)``) rather than a 0-d array, ``key_impl`` the implementation of a
    typed JAX key array (``"threefry2x32"``), whose ``dtype`` and ``shape`` are then
    those of its ``jax.random.key_data``.
    """

    dtype: str
    shape: tuple[int, ...]
    device: str | None = None
    scalar: bool = False
    key_impl: str | None = None


class ArrayAdapter(Protocol):
    """One framework's arrays."""

    #: recorded in the tree, so a restore that has to build a new array knows the kind.
    framework: str

    def owns(self, value: object) -> bool:
        """Whether ``value`` is an array of this framework."""
        ...

    def spec(self, value: Any) -> ArraySpec:
        """dtype, shape and device of ``value``; raises TypeError (no path) if unsupported."""
        ...

    def to_tensor_data(self, value: Any, *, copy: bool) -> TensorData:
        """The array's bytes (aliasing its memory where possible unless ``copy``)."""
        ...

    def identity(self, value: Any) -> Hashable | None:
        """A key that two values share only when they are the same array (one memory,
        one layout: tied weights), or None when ``value`` is never stored tied.

        A checkpoint stores a tied array's bytes once, under the first name, and
        restores every name from them. The key is only compared while ``value`` lives.
        """
        ...

    def writable_problem(self, value: Any) -> str | None:
        """Why ``value`` cannot be restored (e.g. a read-only array), or None."""
        ...

    def restore(self, target: Any, data: TensorData, spec: ArraySpec) -> Any:
        """Write ``data`` into ``target`` in place and return it, or return a replacement."""
        ...

    def host_view(self, target: Any) -> np.ndarray[Any, Any] | None:
        """A writable uint8 NumPy view of ``target``'s bytes when copying raw little-endian
        bytes into it restores it (contiguous host memory), else None (use ``restore``).

        Restores copy into these views in one batch, large ones on several threads.
        """
        ...

    def build(self, data: TensorData, spec: ArraySpec) -> Any:
        """A new array owning a copy of ``data``."""
        ...


class StatefulAdapter(Protocol):
    """Objects with ``state_dict()`` and ``load_state_dict()``."""

    def owns(self, value: object) -> bool:
        """Whether this adapter handles ``value``."""
        ...

    def problems(self, obj: Any, saved: Any) -> list[tuple[Any, str]]:
        """Mismatches between ``obj`` and a saved state dict, found before anything loads.

        ``saved`` is the saved state dict with an :class:`ArraySpec` in place of each
        array. Returns ``(key, problem)`` pairs, ``key`` being the state dict's top-level
        key involved, or None when the whole object cannot take ``saved``.
        """
        ...

    def load(self, obj: Any, state_dict: Any, *, strict: bool) -> None:
        """Load ``state_dict`` into ``obj``; ``strict=False`` when some keys were left out."""
        ...
