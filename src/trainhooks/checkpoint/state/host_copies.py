"""Copying a restore's checked bytes into the user's host arrays, in one batch.

``tree_restore.Restorer`` plans a restore and records the copies into host memory here
(:class:`HostCopies`); once everything is checked, :meth:`HostCopies.run` performs them:
many small ones in a tight loop, the large ones (at least :data:`PARALLEL_COPY_BYTES`)
on a few threads, as NumPy releases the GIL while it copies.
"""

from __future__ import annotations

import bisect
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from operator import attrgetter, itemgetter, setitem
from typing import Any, TypeVar

import numpy as np

from trainhooks.checkpoint.format.columns import GATHER_DTYPES
from trainhooks.checkpoint.format.mapped_checkpoint import Located
from trainhooks.checkpoint.format.tensor import TensorData

__all__ = ["PARALLEL_COPY_BYTES", "HostCopies", "Run", "plan_run"]

Key = TypeVar("Key")

#: Copies of at least this many bytes run on the copy threads.
PARALLEL_COPY_BYTES = 4 * 2**20


class HostCopies:
    """The copies into host memory a restore planned, run together by :meth:`run`.

    * ``located``: ``(target, file, start, end)``: ``file[start:end]`` (a mapped data
      file as a uint8 array) into the plain NumPy array ``target``;
    * ``runs``: many located copies at once (:meth:`add_run`), in the order recorded;
    * ``small``: ``(target, buffer)``: a small C-contiguous array from a byte buffer;
    * ``host``: ``(uint8 view of the target, TensorData)``: anything else.

    Example:
        >>> import numpy as np
        >>> w, file = np.zeros(2, np.uint8), np.arange(4, dtype=np.uint8)
        >>> copies = HostCopies()
        >>> copies.located.append((w, file, 2, 4))
        >>> copies.run()
        >>> w
        array([2, 3], dtype=uint8)
    """

    def __init__(self) -> None:
        self.host: list[tuple[np.ndarray[Any, Any], TensorData]] = []
        self.small: list[tuple[np.ndarray[Any, Any], memoryview]] = []
        self.located: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, int]] = []
        self.runs: list[tuple[int, Run]] = []  # (len(located) when added, run)

    def add_run(
        self,
        targets: list[np.ndarray[Any, Any]],
        source: np.ndarray[Any, Any],
        starts: np.ndarray[Any, Any],
        ends: np.ndarray[Any, Any],
    ) -> None:
        """Record ``source[starts[i]:ends[i]]`` into each ``targets[i]`` (plain NumPy arrays
        of the saved dtype and shape); one Python tuple per run, not per array."""
        self.runs.append((len(self.located), (targets, source, starts, ends)))

    def take_large(
        self, claim: Callable[[int, int], Key | None]
    ) -> list[tuple[np.ndarray[Any, Any], Key]]:
        """Take out the large copies whose source ``claim`` accepts, to be done elsewhere.

        ``claim(address, nbytes)`` sees where a copy of at least
        :data:`PARALLEL_COPY_BYTES` into C-contiguous memory would read from; what it
        returns (not None) comes back beside the destination as a flat uint8 array, and
        :meth:`run` no longer performs that copy. Destinations never overlap: a copy
        into memory another taken copy writes (one array under two names, tied
        weights) stays here. A restore that reads large tensors straight from the file
        into the user's memory (``restore.py``) uses it.
        """
        taken: list[tuple[np.ndarray[Any, Any], Key]] = []
        spans = _Spans()

        def take(target: np.ndarray[Any, Any], address: int, nbytes: int) -> bool:
            if nbytes < PARALLEL_COPY_BYTES or not target.flags.c_contiguous:
                return False
            where = target.ctypes.data
            if spans.overlaps(where, where + target.nbytes):
                return False
            key = claim(address, nbytes)
            if key is None:
                return False
            spans.add(where, where + target.nbytes)
            taken.append((target.reshape(-1).view(np.uint8), key))
            return True

        kept: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, int]] = []
        kept_before = []  # kept_before[i]: how many of located[:i] are kept
        for job in self.located:
            kept_before.append(len(kept))
            target, source, start, end = job
            if not take(target, source.ctypes.data + start, end - start):
                kept.append(job)
        kept_before.append(len(kept))
        runs = []
        for position, (targets, source, starts, ends) in self.runs:
            if ((ends - starts) >= PARALLEL_COPY_BYTES).any():  # else no Python loop
                base = source.ctypes.data
                mask = np.array(
                    [
                        not take(t, base + a, b - a)
                        for t, a, b in zip(targets, starts.tolist(), ends.tolist())
                    ],
                    dtype=bool,
                )
                targets = [t for t, keep in zip(targets, mask.tolist()) if keep]
                starts, ends = starts[mask], ends[mask]
            runs.append((kept_before[position], (targets, source, starts, ends)))
        self.located, self.runs = kept, runs
        host = []
        for dst, data in self.host:
            source = np.frombuffer(data.buffer, np.uint8)
            if not take(dst, source.ctypes.data, source.nbytes):
                host.append((dst, data))
        self.host = host
        return taken

    def run(self) -> None:
        """Perform every copy: the located ones and runs, the small ones, then the rest."""
        done = 0
        for position, run in self.runs:
            _copy_located(self.located[done:position])
            _copy_run(*run)
            done = position
        _copy_located(self.located[done:] if done else self.located)
        self.located, self.runs = [], []  # 100k tuples: freed before the collector is back on
        for target, buffer in self.small:
            target.data.cast("B")[:] = buffer
        copies = self.host
        large = [c for c in copies if c[0].nbytes >= PARALLEL_COPY_BYTES]
        for dst, data in copies:
            if dst.nbytes < PARALLEL_COPY_BYTES:
                dst[:] = np.frombuffer(data.buffer, np.uint8)
        if len(large) > 1:
            workers = min(len(large), os.cpu_count() or 1, 8)
            with ThreadPoolExecutor(workers, thread_name_prefix="trainhooks-restore") as pool:
                list(pool.map(_copy, large))
        else:
            for job in large:
                _copy(job)


def plan_run(
    copies: HostCopies,
    target: dict[Any, Any],
    keys: list[Any],
    nodes: list[Any],
    prefix: str,
    locate_many: Callable[[list[str]], Located | None],
) -> bool:
    """Record the copies into a dict of plain NumPy arrays that match their saved nodes
    exactly (same keys in the same order, dtypes, shapes, writable, all in the checkpoint)
    as one run, checked in C loops: a state of 100k arrays spends its restore here.

    Returns False, with nothing recorded, for anything else; the per-key walk then
    handles the dict (and reports what does not match). ``keys`` and ``nodes`` are the
    dict node's key and value lists, ``prefix`` the tensor names' (``"model/"``).
    """
    values = list(target.values())
    if (
        list(target) != keys
        or set(map(type, keys)) != {str}
        or set(map(type, values)) != {np.ndarray}
        or set(map(type, nodes)) != {list}
        or set(map(len, nodes)) != {3}
    ):
        return False
    codes = list(map(GATHER_DTYPES.get, map(attrgetter("dtype"), values)))
    if list(map(itemgetter(1), nodes)) != codes:
        return False
    if not all(map(attrgetter("flags.writeable"), values)):
        return False
    found = locate_many([prefix + key for key in keys] if prefix else keys)
    if found is None or found[0] != codes:
        return False
    saved_shapes = found[1]  # one tuple per distinct shape: compared, never rebuilt
    as_lists = {shape: list(shape) for shape in set(saved_shapes)}
    node_shapes = list(map(itemgetter(2), nodes))
    if list(map(attrgetter("shape"), values)) != saved_shapes:
        return False
    if node_shapes != list(map(as_lists.__getitem__, saved_shapes)):
        return False
    copies.add_run(values, *found[2:])
    return True


#: A run of located copies: (targets, source, starts, ends), offsets as int64 arrays.
Run = tuple[
    list[np.ndarray[Any, Any]], np.ndarray[Any, Any], np.ndarray[Any, Any], np.ndarray[Any, Any]
]


def _copy_run(
    targets: list[np.ndarray[Any, Any]],
    source: np.ndarray[Any, Any],
    starts: np.ndarray[Any, Any],
    ends: np.ndarray[Any, Any],
) -> None:
    """Copy a run; the common one (one dtype, aligned, 1-d, small) in C loops.

    ``map(setitem, ...)`` drives ``target[...] = source`` without a Python frame per
    array; arrays of one size lying back to back are the rows of one 2-d view, so not
    even a slice is built per array (100k arrays of 1 KiB: ~30 ms, a loop ~50 ms).
    """
    dtypes = set(map(attrgetter("dtype"), targets))
    if len(dtypes) == 1:
        k = dtypes.pop().itemsize
        if (
            not (starts % k).any()
            and not ((ends - starts) >= PARALLEL_COPY_BYTES).any()
            and set(map(attrgetter("ndim"), targets)) == {1}
        ):
            typed = source[: source.size - source.size % k].view(targets[0].dtype)
            first, last = starts // k, ends // k
            sizes = last - first
            if len(targets) and (sizes == sizes[0]).all() and (first[1:] == last[:-1]).all():
                a, n = int(first[0]), int(sizes[0])
                rows: Any = typed[a : a + n * len(targets)].reshape(len(targets), n)
            else:
                rows = map(typed.__getitem__, map(slice, first.tolist(), last.tolist()))
            deque(map(setitem, targets, repeat(Ellipsis), rows), 0)  # type: ignore[arg-type]
            return
    _copy_located(list(zip(targets, repeat(source), starts.tolist(), ends.tolist())))


def _copy_located(jobs: list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, int]]) -> None:
    """Copy ``source[start:end]`` into each target; large ones on a few threads."""
    large = []
    source_of = dtype_of = typed = None
    for job in jobs:
        target, source, start, end = job
        if end - start >= PARALLEL_COPY_BYTES:
            large.append(job)
            continue
        dtype = target.dtype
        k = dtype.itemsize
        if source is not source_of or dtype is not dtype_of:  # one typed view per run
            source_of, dtype_of = source, dtype
            typed = source[: source.size - source.size % k].view(dtype)
        # Not aligned in the file (only a foreign layout): a view of the bytes as they lie.
        chunk = source[start:end].view(dtype) if start % k else typed[start // k : end // k]  # type: ignore[index]
        if target.ndim == 1:
            target[...] = chunk
        else:
            target[...] = chunk.reshape(target.shape)
    if len(large) > 1:
        workers = min(len(large), os.cpu_count() or 1, 8)
        with ThreadPoolExecutor(workers, thread_name_prefix="trainhooks-restore") as pool:
            list(pool.map(_copy_large, large))
    else:
        for job in large:
            _copy_large(job)


def _copy_large(job: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any], int, int]) -> None:
    target, source, start, end = job
    np.copyto(target, source[start:end].view(target.dtype).reshape(target.shape))  # no GIL


def _copy(job: tuple[np.ndarray[Any, Any], TensorData]) -> None:
    dst, data = job
    dst[:] = np.frombuffer(data.buffer, np.uint8)  # releases the GIL


class _Spans:
    """Disjoint ``[start, end)`` address ranges, to tell whether a new one overlaps any."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self._starts, start)
        if i and self._ends[i - 1] > start:
            return True
        return i < len(self._starts) and self._starts[i] < end

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_right(self._starts, start)
        self._starts.insert(i, start)
        self._ends.insert(i, end)
