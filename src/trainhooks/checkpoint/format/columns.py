"""``TensorColumns``: the tensors of a flattened state as columns, not one object per tensor.

A state may hold 100k small arrays. Giving each a ``TensorData`` (a memoryview, its
managed buffer and a tuple) costs ~530 bytes and ~2 us per tensor before a byte is
written; :class:`TensorColumns` keeps four parallel lists instead (names, dtype codes,
shapes, sources) where a source is the NumPy array itself or, for what an adapter had to
convert (torch, JAX, copies), its ``TensorData``. The data file writer gathers runs of
small arrays straight from their sources into one bounded buffer
(:meth:`TensorColumns.gather`), so no per-tensor view ever exists.

It is also a read-only ``Mapping[str, TensorData]``: looking a name up builds that
tensor's ``TensorData`` on demand, so code that wants one tensor still gets one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from operator import attrgetter
from typing import Any, Union

import numpy as np

from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData

__all__ = ["GATHER_DTYPES", "Source", "TensorColumns"]

#: A column entry's bytes: a host NumPy array of a dtype in GATHER_DTYPES, or TensorData.
Source = Union[np.ndarray, TensorData]  # noqa: UP007 (a runtime alias on Python 3.10)

#: Native-order NumPy dtypes whose bytes are stored as they are, by safetensors code.
GATHER_DTYPES: dict[np.dtype[Any], str] = {
    np.dtype(t): code
    for t, code in (
        (np.bool_, "BOOL"),
        (np.uint8, "U8"),
        (np.int8, "I8"),
        (np.uint16, "U16"),
        (np.int16, "I16"),
        (np.float16, "F16"),
        (np.uint32, "U32"),
        (np.int32, "I32"),
        (np.float32, "F32"),
        (np.uint64, "U64"),
        (np.int64, "I64"),
        (np.float64, "F64"),
        (np.complex64, "C64"),
    )
}
_NDARRAY = np.ndarray
_DTYPE = attrgetter("dtype")


class TensorColumns(Mapping[str, TensorData]):
    """Named tensors as parallel lists; a ``Mapping`` of name to ``TensorData`` on demand.

    Args:
      names: tensor names (unique).
      codes: each tensor's safetensors dtype code.
      shapes: each tensor's shape.
      sources: each tensor's bytes: a NumPy array whose dtype is in :data:`GATHER_DTYPES`
        (any strides; read when written) or a ``TensorData``.

    Example:
        >>> import numpy as np
        >>> cols = TensorColumns(["w"], ["F32"], [(2,)], [np.ones(2, np.float32)])
        >>> cols["w"].dtype, bytes(cols["w"].buffer)[:4]
        ('F32', b'\\x00\\x00\\x80?')
    """

    __slots__ = ("_index", "codes", "names", "shapes", "sources")

    def __init__(
        self,
        names: list[str],
        codes: list[str],
        shapes: list[tuple[int, ...]],
        sources: list[Source],
    ) -> None:
        if not len(names) == len(codes) == len(shapes) == len(sources):
            raise ValueError(
                f"TensorColumns needs columns of one length, got {len(names)} names, "
                f"{len(codes)} codes, {len(shapes)} shapes and {len(sources)} sources"
            )
        self.names = names
        self.codes = codes
        self.shapes = shapes
        self.sources = sources
        self._index: dict[str, int] | None = None

    @classmethod
    def from_mapping(cls, tensors: Mapping[str, TensorData]) -> TensorColumns:
        """Columns over ``TensorData`` values (what a hand-built ``FlatState`` holds)."""
        if isinstance(tensors, TensorColumns):
            return tensors
        names = list(tensors)
        values = [tensors[n] for n in names]
        return cls(names, [t.dtype for t in values], [t.shape for t in values], list(values))

    def index(self) -> dict[str, int]:
        """Name -> position (built once)."""
        if self._index is None:
            self._index = dict(zip(self.names, range(len(self.names))))
        return self._index

    def nbytes(self) -> list[int]:
        """Bytes of every tensor, from its dtype code and shape."""
        sizes: dict[tuple[str, tuple[int, ...]], int] = {}
        out = []
        for key in zip(self.codes, self.shapes):
            n = sizes.get(key)
            if n is None:
                n = sizes[key] = DTYPE_ITEMSIZE[key[0]] * math.prod(key[1])
            out.append(n)
        return out

    def bytes_of(self, i: int) -> memoryview:
        """Tensor ``i``'s bytes as a C-contiguous byte memoryview (a copy only if strided)."""
        source = self.sources[i]
        if type(source) is _NDARRAY:
            return np.ascontiguousarray(source).reshape(-1).view(np.uint8).data
        return source.buffer  # type: ignore[union-attr]

    def joined(self, order: Sequence[int], nbytes: int) -> bytes | None:
        """The bytes of tensors ``order`` (``nbytes`` in all) back to back, when every one is
        a plain C-contiguous array; None otherwise (then :meth:`gather` them).

        ``bytes.join`` reads each array's buffer in C: half the time of ``np.concatenate``
        for 1 KiB arrays, with no dtype to agree on. A strided array has no such buffer.
        """
        picked = self._picked(order)
        if not picked or set(map(type, picked)) != {_NDARRAY}:
            return None
        try:
            data = b"".join(picked)  # type: ignore[arg-type]
        except TypeError:  # not C-contiguous
            return None
        return data if len(data) == nbytes else None

    def _picked(self, order: Sequence[int]) -> list[Source]:
        sources = self.sources
        if type(order) is range and order.step == 1:
            return sources[order.start : order.stop]
        return [sources[i] for i in order]

    def gather(self, order: Sequence[int], sizes: list[int], out: np.ndarray[Any, Any]) -> int:
        """Copy the bytes of tensors ``order`` (of ``sizes`` bytes) back to back into ``out``.

        ``out`` is a uint8 array. Runs of arrays of one dtype go through one
        ``np.concatenate`` each (a C loop), so the per-tensor cost is a few list
        operations, or none when all are arrays of one dtype. Returns the bytes written.
        """
        sources = self.sources
        picked = self._picked(order)
        # The common case in bulk: plain arrays of one dtype (a state of 100k small tensors)
        # take one concatenate and no per-tensor step; the loop below is the general case.
        if picked and set(map(type, picked)) == {_NDARRAY}:
            dtypes = set(map(_DTYPE, picked))
            if len(dtypes) == 1:
                n = sum(sizes)
                arrays: list[np.ndarray[Any, Any]] = picked  # type: ignore[assignment]
                np.concatenate(arrays, axis=None, out=out[:n].view(dtypes.pop()))
                return n
        position = 0
        j, count = 0, len(order)
        while j < count:
            source = sources[order[j]]
            if type(source) is not _NDARRAY:
                data = source.buffer  # type: ignore[union-attr]
                n = sizes[j]
                out[position : position + n] = np.frombuffer(data, np.uint8)
                position += n
                j += 1
                continue
            dtype = source.dtype
            start = j
            j += 1
            while j < count:
                nxt = sources[order[j]]
                if type(nxt) is not _NDARRAY or nxt.dtype is not dtype:
                    break
                j += 1
            n = sum(sizes[start:j])
            run: list[np.ndarray[Any, Any]] = [sources[i] for i in order[start:j]]  # type: ignore[misc]
            np.concatenate(run, axis=None, out=out[position : position + n].view(dtype))
            position += n
        return position

    def __getitem__(self, name: str) -> TensorData:
        try:
            i = self.index()[name]
        except KeyError:
            near = sorted(n for n in self.names if n.split("/")[0] == name.split("/")[0])[:5]
            hint = f"; tensors with the same top-level entry: {near}" if near else ""
            raise KeyError(
                f"no tensor {name!r} among the {len(self.names)} tensors of this state{hint}"
            ) from None
        return TensorData(self.codes[i], self.shapes[i], self.bytes_of(i))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.index()

    def __repr__(self) -> str:
        return f"TensorColumns({len(self.names)} tensors)"
