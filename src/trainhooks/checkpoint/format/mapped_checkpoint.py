"""``MappedCheckpoint``: an opened checkpoint whose bytes are checksummed before use.

``format.open_checkpoint`` checks the manifest and every data file's size and header,
then hands the memory-mapped files to a :class:`MappedCheckpoint`. Its tensors are
checksummed, run by run (``manifest.py``), on first access, or all at once by
:meth:`MappedCheckpoint.verify`, which hashes the runs straight from the mappings on a
few threads; nothing unchecked is returned unless asked for (``unchecked=True``). A
restore that may write before everything is checked (``Saver(atomic_restore=False)``)
instead reads the large runs straight into their destinations and checksums them there
(:meth:`MappedCheckpoint.read_runs`): one pass over the data, no second copy.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, CancelledError, Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Any

import numpy as np
import xxhash

from trainhooks.checkpoint.format.manifest import (
    Chunk,
    Manifest,
    TensorEntry,
    TensorIndex,
    checksum,
)
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.storage import ReadableFile
from trainhooks.errors import DataLossError, NotFoundError

__all__ = ["Located", "Locator", "MappedCheckpoint", "RunKey"]

#: Where many tensors' bytes lie: (dtype codes, shapes, file, starts, ends), the offsets
#: as int64 arrays (see :meth:`MappedCheckpoint.locate_many`).
Located = tuple[
    list[str],
    list[tuple[int, ...]],
    np.ndarray[Any, Any],
    np.ndarray[Any, Any],
    np.ndarray[Any, Any],
]

#: A checksum run: (data file, index of the run in the file's ``chunks``).
RunKey = tuple[str, int]

# verify() hashes on this many threads: enough reads in flight for a disk that is not
# cached, few enough to leave the copies' memory bandwidth alone.
_VERIFY_THREADS = 4
# read_runs() reads each data file front to back on a thread of its own, at most this
# many files at once, up to _READ_STEP bytes per read. Threads sharing one file (its
# readahead follows one reader) were slower, and so were smaller reads: docs/format.md
# has the figures.
_READ_FILES = 8
_READ_STEP = 64 * 2**20
# ...in at most this many pieces (one preadv takes at most IOV_MAX, 1024 on Linux).
_READ_PIECES = 512
# ...and makes a long run's pages resident this many bytes at a time.
_POPULATE_STEP = 8 * 2**20


class MappedCheckpoint:
    """A checkpoint opened by :func:`open_checkpoint`: manifest plus memory-mapped data files.

    The manifest and every file's size and header were checked on opening. Tensor
    bytes are checksummed on first access (:meth:`tensor_data`) or all at once
    (:meth:`verify`); nothing unchecked is returned unless asked for. Close it (or use
    ``with``) to unmap the files; memoryviews handed out keep their mapping alive.

    Example:
        >>> with open_checkpoint("ckpt/model.ckpt-200") as ckpt:  # doctest: +SKIP
        ...     ckpt.verify()
        ...     w = ckpt.tensor_data("model/weight")
    """

    def __init__(self, prefix: str, manifest: Manifest) -> None:
        self.prefix = prefix
        self.manifest = manifest
        self._files: dict[str, ReadableFile] = {}
        self._views: dict[str, memoryview] = {}
        self._verified: set[tuple[str, int]] = set()  # (file, chunk index)
        self._all_verified = False
        self._arrays: dict[str, np.ndarray[Any, Any]] = {}
        tensors = manifest.tensors
        self._index = (
            tensors if isinstance(tensors, TensorIndex) else TensorIndex(manifest.files, {})
        )
        self._single = next(iter(manifest.files.items())) if len(manifest.files) == 1 else None
        self._single_index = self._index.positions
        self._single_array: np.ndarray[Any, Any] | None = None
        self._single_offsets: np.ndarray[Any, Any] | None = None
        # for claim_run: where each file's view lies in memory, and its runs by start
        self._bases: list[tuple[int, int, str]] | None = None
        self._runs_at: dict[str, dict[int, int]] = {}

    def map_file(self, file: str, handle: ReadableFile) -> memoryview:
        """View the open data file ``handle``, which now belongs to this object."""
        self._files[file] = handle
        view = self._views[file] = handle.view()
        return view

    @property
    def global_step(self) -> int:
        """The global step the checkpoint was saved at."""
        return self.manifest.global_step

    @property
    def wall_time(self) -> float:
        """When the checkpoint was written (seconds since the epoch)."""
        return self.manifest.wall_time

    @property
    def tree(self) -> object:
        """The state's structure as ``tree.flatten_state`` described it (JSON)."""
        return self.manifest.tree

    @property
    def metadata(self) -> dict[str, object]:
        """The user metadata passed to ``write_checkpoint``."""
        return self.manifest.metadata

    @property
    def names(self) -> list[str]:
        """Every tensor name, ``"global_step"`` included, sorted."""
        return sorted(self.manifest.tensors)

    def entry(self, name: str) -> TensorEntry:
        """The manifest entry of tensor ``name``.

        Raises:
          NotFoundError: no tensor ``name``; the message lists close names.
        """
        entry = self.manifest.tensors.get(name)
        if entry is None:
            close = difflib.get_close_matches(name, self.manifest.tensors, n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise NotFoundError(f"Key {name} not found in checkpoint {self.prefix}.{hint}")
        return entry

    def tensor_data(self, name: str, *, unchecked: bool = False) -> TensorData:
        """Tensor ``name`` as a read-only view of the mapped file, checksummed first.

        The checksum covers the run of tensors stored with it (``manifest.py``); once
        checked, the run is not checked again. A sharded tensor (``boxes.py``) comes back
        whole, in new memory, from the boxes that hold it. ``unchecked=True`` skips the
        checksum, as for :meth:`locate`: only for a caller that reads the view's bytes
        after its own :meth:`verify` and :meth:`read_runs` returned.

        Raises:
          NotFoundError: no tensor ``name``.
          DataLossError: its bytes do not match the manifest's checksum.
        """
        entry = self.manifest.tensors.get(name)
        if entry is None and name in self.manifest.sharded:
            from trainhooks.checkpoint.format.sharded_read import read_region

            return read_region(self, name)  # the whole tensor, put together from its boxes
        entry = entry or self.entry(name)
        if not (unchecked or self._all_verified or (entry.file, entry.chunk) in self._verified):
            chunk = self.manifest.files[entry.file].chunks[entry.chunk]
            self._check(
                entry.file, entry.chunk, checksum(self._views[entry.file][chunk.start : chunk.end])
            )
        return TensorData(
            entry.dtype, entry.shape, self._views[entry.file][entry.start : entry.end]
        )

    def locate(
        self, name: str, *, unchecked: bool = False
    ) -> tuple[str, tuple[int, ...], np.ndarray[Any, Any], int, int]:
        """Where tensor ``name``'s checked bytes lie: ``(dtype code, shape, file, start, end)``.

        ``file`` is the whole mapped data file as a read-only uint8 array; the tensor is
        ``file[start:end]``. Its checksum run is checked first, like :meth:`tensor_data`
        (nothing after :meth:`verify`); no per-tensor view is made, so restoring 100k
        tensors copies straight from the mapping. ``unchecked=True`` skips the checksum:
        only for a caller that reads the bytes after its own :meth:`verify` returned.

        Raises:
          KeyError: no tensor ``name``.
          DataLossError: its bytes do not match the manifest's checksum.
        """
        if self._single is not None:  # one data file: no search for the file
            fname, entry = self._single
            i = self._single_index[name]
            if (self._all_verified or unchecked) and self._single_array is not None:
                return (
                    entry.dtypes[i],
                    entry.shapes[i],
                    self._single_array,
                    entry.offsets[i],
                    entry.offsets[i + 1],
                )
        else:
            fname, entry, i = self._index.locate(name)
        if not (self._all_verified or unchecked):
            found = self.manifest.tensors[name]
            if (fname, found.chunk) not in self._verified:
                self.tensor_data(name)
        array = self._arrays.get(fname)
        if array is None:
            array = self._arrays[fname] = np.frombuffer(self._views[fname], np.uint8)
            if self._single is not None:
                self._single_array = array
        return entry.dtypes[i], entry.shapes[i], array, entry.offsets[i], entry.offsets[i + 1]

    def locate_many(self, names: list[str], *, unchecked: bool = False) -> Located | None:
        """:meth:`locate` for many tensors at once, in C loops rather than a call each.

        Returns None (the caller then locates one by one) unless the checkpoint has a
        single data file that :meth:`verify` checked (or ``unchecked``, as in
        :meth:`locate`) and holds every name.
        """
        if self._single is None or not (self._all_verified or unchecked):
            return None
        fname, entry = self._single
        index = self._single_index
        offsets = self._single_offsets
        if offsets is None:
            offsets = self._single_offsets = np.array(entry.offsets, np.int64)
        array = self._single_array
        if array is None:
            array = self._single_array = self._arrays[fname] = np.frombuffer(
                self._views[fname], np.uint8
            )
        first = index.get(names[0]) if names else None
        if first is not None and entry.names[first : first + len(names)] == tuple(names):
            # In file order (a state restored as it was saved): slices, no lookups.
            last = first + len(names)
            return (
                list(entry.dtypes[first:last]),
                list(entry.shapes[first:last]),
                array,
                offsets[first:last],
                offsets[first + 1 : last + 1],
            )
        try:
            positions = np.fromiter(map(index.__getitem__, names), np.int64, len(names))
        except KeyError:
            return None
        order = positions.tolist()
        return (
            list(map(entry.dtypes.__getitem__, order)),
            list(map(entry.shapes.__getitem__, order)),
            array,
            offsets[positions],
            offsets[positions + 1],
        )

    def locator(self, *, unchecked: bool = False) -> Locator:
        """:meth:`locate` (bound to ``unchecked``) as a callable with a batch form, for
        ``tree.restore_state(..., locate=...)``."""
        return Locator(self, unchecked)

    def _check(self, file: str, index: int, actual: str) -> None:
        chunk = self.manifest.files[file].chunks[index]
        if actual != chunk.checksum:
            names = self.manifest.files[file].names[chunk.first : chunk.first + chunk.tensor_count]
            which = (
                f"tensor {names[0]!r}"
                if len(names) == 1
                else f"one of the {len(names)} tensors checksummed together: "
                + ", ".join(repr(n) for n in names[:5])
                + (", ..." if len(names) > 5 else "")
            )
            raise DataLossError(
                f"Checkpoint {self.prefix}: file {file}: {which}: checksum mismatch "
                f"(manifest {chunk.checksum}, data {actual}, bytes [{chunk.start}, "
                f"{chunk.end})); the data is corrupt"
            )
        self._verified.add((file, index))

    def verify(
        self,
        num_threads: int | None = None,
        *,
        files: Any = None,
        exclude: Collection[RunKey] = (),
        stop: threading.Event | None = None,
    ) -> None:
        """Checksum every tensor, checksum run by run, on a few threads (``num_threads``).

        Each run is checksummed straight from the file's mapping (no copy): its pages are
        first made resident in large steps (the file's ``populate``, see
        :func:`_checksum_mapped`: the kernel reads a file that is not cached with large
        reads, several in flight, and maps a cached one without a fault per page), then
        hashed (``xxhash`` releases the GIL). Runs are taken in offset order, the files
        side by side, so every file is read front to back. The copies that
        follow read the same, now mapped, pages: one read of the disk, one pass over
        memory to check, one to copy.

        ``files`` (names) limits the check to those data files; the others are then
        checksummed on access, as before. ``exclude`` names runs left to
        :meth:`read_runs`, which checks them as it reads them; with ``stop`` shared
        between the two, a mismatch found by either stops both (this one raises its
        own mismatch, else ``CancelledError`` if it was stopped before it was done).

        Raises:
          DataLossError: naming the checkpoint, file and tensor of the first mismatch.
        """
        jobs = [
            (file, i, chunk)
            for file, entry in self.manifest.files.items()
            if files is None or file in files
            for i, chunk in enumerate(entry.chunks)
            if (file, i) not in self._verified and (file, i) not in exclude
        ]
        jobs.sort(key=lambda job: job[2].start)  # every file front to back, side by side
        threads = min(len(jobs), num_threads or _VERIFY_THREADS)

        def digest(job: tuple[str, int, Chunk]) -> str | None:
            file, _, chunk = job
            if stop is not None and stop.is_set():
                return None  # a failure here or in read_runs: left unchecked
            actual = _checksum_mapped(self._files[file], self._views[file], chunk.start, chunk.end)
            if stop is not None and actual != chunk.checksum:
                stop.set()  # raised below, in offset order
            return actual

        if threads <= 1:
            digests = list(map(digest, jobs))
        else:
            with ThreadPoolExecutor(threads, thread_name_prefix="trainhooks-verify") as pool:
                digests = list(pool.map(digest, jobs))
        for (file, index, _), actual in zip(jobs, digests):
            if actual is not None:
                self._check(file, index, actual)
        if None in digests:
            raise CancelledError  # stopped by read_runs, which raises its own failure
        self._all_verified = files is None and not exclude

    def claim_run(self, address: int, nbytes: int) -> RunKey | None:
        """The checksum run whose bytes are exactly the ``nbytes`` at ``address``, if any.

        ``address`` is a memory address inside one of the files' views (where a planned
        copy reads from); None unless a whole run, not yet checked, lies there. A
        restore hands the copies so claimed to :meth:`read_runs`.
        """
        if self._bases is None:
            self._bases = [
                (np.frombuffer(view, np.uint8).ctypes.data, len(view), file)
                for file, view in self._views.items()
            ]
        found = next((b for b in self._bases if b[0] <= address < b[0] + b[1]), None)
        if found is None:
            return None
        base, _, file = found
        runs = self._runs_at.get(file)
        if runs is None:
            chunks = self.manifest.files[file].chunks
            runs = self._runs_at[file] = {chunk.start: i for i, chunk in enumerate(chunks)}
        index = runs.get(address - base)
        if index is None or (file, index) in self._verified:
            return None
        chunk = self.manifest.files[file].chunks[index]
        return (file, index) if chunk.end - chunk.start == nbytes else None

    def read_runs(
        self,
        jobs: Sequence[tuple[np.ndarray[Any, Any], RunKey]],
        num_threads: int | None = None,
        *,
        stop: threading.Event | None = None,
    ) -> int:
        """Read each checksum run straight into its destination and checksum it there.

        Each job is ``(destination, run)``: a writable, C-contiguous uint8 array of the
        run's size (the user's tensor, as bytes) and a run :meth:`claim_run` returned.
        The runs are read from the file into the destinations themselves, and each is
        hashed as its bytes land. Each file is read front to back by one thread, the
        files side by side (at most ``num_threads`` of them at once): one sequential
        reader per file, which is what the kernel's readahead follows. Each read takes
        up to ``_READ_STEP`` bytes of the file, the runs it spans back to back filled in
        one call (``readinto_many``: one ``preadv`` on a local disk; else ``readinto``
        per destination). One read of the disk and no second copy, but the destination
        holds the bytes before they are checked: on a mismatch it holds the corrupt
        ones.

        The first failure (or ``stop``, set from outside: :meth:`verify` alongside)
        stops every thread before its next read and leaves the runs not started unread
        (but for those that share the failing run's last read, in part or whole); none
        is left reading when this returns or raises. A failure here sets ``stop``.

        Returns:
          The number of bytes read.

        Raises:
          DataLossError: a run's checksum does not match, or its file ends early.
          OSError: reading failed (the storage's error).
          CancelledError: ``stop`` was set from outside.
        """
        streams: dict[str, list[tuple[np.ndarray[Any, Any], RunKey]]] = {}
        for job in sorted(
            jobs, key=lambda job: self.manifest.files[job[1][0]].chunks[job[1][1]].start
        ):
            streams.setdefault(job[1][0], []).append(job)
        stop = threading.Event() if stop is None else stop

        def read(stream: list[tuple[np.ndarray[Any, Any], RunKey]]) -> int:
            try:
                return read_file(stream)
            except BaseException:
                stop.set()  # every other thread stops before its next read
                raise

        def read_file(stream: list[tuple[np.ndarray[Any, Any], RunKey]]) -> int:
            """Read one file's runs in order, a step of up to ``_READ_STEP`` bytes (one
            ``preadv``, the runs it spans side by side) at a time."""
            file = stream[0][1][0]
            runs: list[tuple[int, memoryview, int]] = []
            for destination, (_, index) in stream:
                chunk = self.manifest.files[file].chunks[index]
                if destination.nbytes != chunk.end - chunk.start:
                    raise ValueError(
                        f"{file}: run {index} holds {chunk.end - chunk.start} bytes, the "
                        f"destination {destination.nbytes}"
                    )
                runs.append((chunk.start, destination.data.cast("B"), len(runs)))
            # A hasher per job, not per run: one run may be read into two destinations
            # (a tensor stored once, restored into two arrays).
            hashers = [xxhash.xxh3_128() for _ in runs]
            for position, pieces in _steps(runs, _READ_STEP):
                if stop.is_set():
                    raise CancelledError  # another run failed: read no more
                self._read_exactly(file, position, [piece for piece, _, _ in pieces])
                for piece, job, last in pieces:
                    hashers[job].update(piece)
                    if last:
                        self._check(file, stream[job][1][1], str(hashers[job].hexdigest()))
            return sum(len(out) for _, out, _ in runs)

        threads = min(len(streams), num_threads or _READ_FILES)
        if threads <= 1:
            return sum(map(read, streams.values()))
        pool = ThreadPoolExecutor(threads, thread_name_prefix="trainhooks-read")
        futures: list[Future[int]] = []
        try:
            futures += (pool.submit(read, stream) for stream in streams.values())
            wait(futures, return_when=FIRST_EXCEPTION)
        except BaseException:  # interrupted while waiting, or no thread could start
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        failures = [e for f in futures if not f.cancelled() and (e := f.exception())]
        if failures:
            # The failure itself, not a thread it stopped; the first file's (by the
            # offset of its first run).
            causes = [e for e in failures if not isinstance(e, CancelledError)]
            raise (causes or failures)[0]
        return sum(f.result() for f in futures)

    def _read_exactly(self, file: str, position: int, buffers: list[memoryview]) -> None:
        """Fill ``buffers``, in order, with the file's bytes from ``position`` on."""
        handle = self._files[file]
        readinto_many = getattr(handle, "readinto_many", None)
        pending = [buffer for buffer in buffers if len(buffer)]
        while pending:
            if readinto_many is not None:
                got = readinto_many(position, pending)
            else:
                got = handle.readinto(position, pending[0])
            if got <= 0:
                raise DataLossError(
                    f"Checkpoint {self.prefix}: file {file} ends at byte {position}, "
                    f"inside a tensor's bytes: it is shorter than when it was opened"
                )
            position += got
            while got:  # drop what was filled
                if got >= len(pending[0]):
                    got -= len(pending.pop(0))
                else:
                    pending[0], got = pending[0][got:], 0

    def close(self) -> None:
        """Unmap the data files (those still viewed stay mapped until the views go)."""
        self._arrays = {}
        self._single_array = self._single_offsets = None
        for view in self._views.values():
            view.release()
        self._views = {}
        for handle in self._files.values():
            handle.close()  # a mapping a TensorData handed out still uses stays alive
        self._files = {}

    def __enter__(self) -> MappedCheckpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"MappedCheckpoint({self.prefix!r}, global_step={self.global_step}, "
            f"tensors={len(self.manifest.tensors)}, files={len(self.manifest.files)})"
        )


class Locator:
    """A checkpoint's :meth:`~MappedCheckpoint.locate` as a callable, plus :meth:`many`.

    Example:
        >>> locate = ckpt.locator()  # doctest: +SKIP
        >>> locate("w")  # doctest: +SKIP
        ('F32', (2,), array([...], dtype=uint8), 256, 264)
    """

    def __init__(self, checkpoint: MappedCheckpoint, unchecked: bool) -> None:
        self._checkpoint = checkpoint
        self._unchecked = unchecked

    def __call__(self, name: str) -> tuple[str, tuple[int, ...], np.ndarray[Any, Any], int, int]:
        """See :meth:`MappedCheckpoint.locate`."""
        return self._checkpoint.locate(name, unchecked=self._unchecked)

    def many(self, names: list[str]) -> Located | None:
        """See :meth:`MappedCheckpoint.locate_many`."""
        return self._checkpoint.locate_many(names, unchecked=self._unchecked)


def _steps(
    runs: Sequence[tuple[int, memoryview, int]], step: int, most: int = _READ_PIECES
) -> Iterator[tuple[int, list[tuple[memoryview, int, bool]]]]:
    """The reads that fill ``runs`` (``(position, destination, key)`` in file order):
    ``(position, [(piece of a destination, key, whether it ends the run), ...])``, each
    read at most ``step`` bytes of the file that lie back to back, in at most ``most``
    pieces."""
    position, size = 0, 0
    pieces: list[tuple[memoryview, int, bool]] = []
    for start, out, index in runs:
        if not len(out):  # nothing to read; checked with the read it joins
            if len(pieces) == most:
                yield position, pieces
                pieces, size = [], 0
            if not pieces:
                position = start
            pieces.append((out, index, True))
            continue
        done = 0
        while done < len(out):
            if pieces and (position + size != start + done or size == step or len(pieces) == most):
                yield position, pieces
                pieces, size = [], 0
            if not pieces:
                position = start + done
            take = min(len(out) - done, step - size)
            pieces.append((out[done : done + take], index, done + take == len(out)))
            size, done = size + take, done + take
    if pieces:
        yield position, pieces


def _checksum_mapped(file: ReadableFile, view: memoryview, start: int, end: int) -> str:
    """The checksum of ``view[start:end]``, its pages made resident ``_POPULATE_STEP`` at a time.

    ``file.populate`` (where the storage has it: a local file's mapping) faults each step
    in with one call; the hash then reads memory that is already mapped.
    """
    populate = getattr(file, "populate", None)
    if populate is None or end - start <= _POPULATE_STEP:
        if populate is not None:
            populate(start, end - start)
        return str(xxhash.xxh3_128(view[start:end]).hexdigest())
    hasher = xxhash.xxh3_128()
    for position in range(start, end, _POPULATE_STEP):
        stop = min(end, position + _POPULATE_STEP)
        populate(position, stop - position)
        hasher.update(view[position:stop])
    return str(hasher.hexdigest())
