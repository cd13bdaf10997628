"""Copying a restore's checked bytes into the user's host arrays, in one batch.

``tree_restore.Restorer`` plans a restore and records the copies into host memory here
(:class:`HostCopies`); once everything is checked, :meth:`HostCopies.run` performs them:
many small ones in a tight loop, the large ones (at least :data:`PARALLEL_COPY_BYTES`)
on a few threads, as NumPy releases the GIL while it copies.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from trainhooks.checkpoint.tensor import TensorData

__all__ = ["PARALLEL_COPY_BYTES", "HostCopies"]

#: Copies of at least this many bytes run on the copy threads.
PARALLEL_COPY_BYTES = 4 * 2**20


class HostCopies:
    """The copies into host memory a restore planned, run together by :meth:`run`.

    * ``located``: ``(target, file, start, end)``: ``file[start:end]`` (a mapped data
      file as a uint8 array) into the plain NumPy array ``target``;
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

    def run(self) -> None:
        """Perform every copy: the located ones, the small ones, then the rest."""
        _copy_located(self.located)
        self.located = []  # 100k tuples: freed before the collector is back on
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
