"""Where checkpoint bytes go: the ``Storage`` Protocol every backend implements.

Every byte of a checkpoint directory goes through a ``Storage``: data files and
manifests (written by a save, read by a restore), the state file (a small object put
atomically, with create-only or compare-and-swap semantics), retention's deletes, the
listeners' copies and the writer lease. A wrapper can therefore count, delay or fail
any single operation (fault injection), and a store that is not a local disk can
replace it.

Paths are plain strings; a ``Storage`` never interprets them beyond its own scheme.
What every backend must guarantee is checked by one contract test suite
(``tests/checkpoint/storage/test_contract.py``):

* a file written with :meth:`Storage.create` is complete and durable once its
  ``fsync`` returned; a small object written with :meth:`Storage.put` is replaced
  atomically (a reader sees the old bytes or the new ones) and durably;
* ``put(..., if_absent=True)`` fails with ``FileExistsError`` when the object exists,
  ``put(..., if_version=v)`` with :class:`PreconditionFailed` when the object changed
  since :meth:`Storage.version` returned ``v``;
* every error is an ``OSError`` (or a subclass) that names the path and keeps errno;
* :attr:`Storage.can_rename` says which commit publishes checkpoints on it
  (``commit.py``): a directory renamed into place, or the manifest written last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "DirectoryReader",
    "Lease",
    "PreconditionFailed",
    "ReadableFile",
    "Storage",
    "WritableFile",
]


class PreconditionFailed(OSError):
    """A conditional put found the object changed since its version was read."""


@runtime_checkable
class WritableFile(Protocol):
    """A new file being written by a save: bytes in order, then fsync, then close."""

    def write(self, buffers: Sequence[memoryview | bytes]) -> None:
        """Append every byte of ``buffers`` in order (retrying short writes)."""
        ...

    def fsync(self) -> None:
        """Make the written bytes durable."""
        ...

    def close(self) -> None:
        """Release the file; idempotent."""
        ...


@runtime_checkable
class ReadableFile(Protocol):
    """A file opened for reading: its size, a read-only view of it, and ranged reads.

    A file may also offer ``populate(start, length)``, a hint that the view's bytes in
    that range are about to be read: a local file's mapping faults them in with one call
    (large reads where the page cache lacks them). Readers look it up with ``getattr``
    and do without it; ``LocalReadFile`` and ``MemoryStorage``'s files have it. Likewise
    ``prefetch(start, length)`` (``LocalReadFile``) starts reading the range in the
    background and returns at once, and ``readinto_many(position, buffers)``
    (``LocalReadFile``: one ``preadv``) fills several buffers from one position, in order.
    """

    size: int

    def view(self) -> memoryview:
        """The whole file as a read-only byte view (a memory map on a local disk)."""
        ...

    def readinto(self, position: int, buffer: memoryview) -> int:
        """Read up to ``len(buffer)`` bytes at ``position``; 0 at the end of the file."""
        ...

    def close(self) -> None:
        """Release the file; views already handed out stay valid. Idempotent."""
        ...


@runtime_checkable
class DirectoryReader(Protocol):
    """A checkpoint directory opened for reading, as it was when it was opened.

    Files opened through it all belong to that directory even if a re-save replaces
    the checkpoint meanwhile; :meth:`replaced` tells a reader whose checks failed that
    it should start over on the new one.
    """

    def open_read(self, name: str) -> ReadableFile:
        """Open the regular file ``name`` of the directory (no symlinks, no FIFOs)."""
        ...

    def replaced(self) -> bool:
        """True if the path now names another checkpoint than the one opened."""
        ...

    def close(self) -> None:
        """Release the directory; files opened through it stay open. Idempotent."""
        ...


@runtime_checkable
class Lease(Protocol):
    """The right to write into one checkpoint directory, held by one process."""

    @property
    def released(self) -> bool:
        """True once :meth:`release` ran."""
        ...

    def release(self) -> None:
        """Give the lease up; idempotent."""
        ...


@runtime_checkable
class Storage(Protocol):
    """The operations that writing, committing, reading and deleting checkpoints need.

    Example:
        >>> from trainhooks.checkpoint.storage import MemoryStorage
        >>> storage: Storage = MemoryStorage()
        >>> storage.put("memory://bucket/run/checkpoint", b"v1", if_absent=True)
        >>> storage.read_bytes("memory://bucket/run/checkpoint", max_bytes=100)
        b'v1'
    """

    #: True where a directory can be renamed into place atomically (a local disk).
    can_rename: bool

    def exists(self, path: str) -> bool:
        """True if ``path`` exists (file or directory, symlinks not followed)."""
        ...

    def is_dir(self, path: str) -> bool:
        """True if ``path`` is a directory (symlinks not followed)."""
        ...

    def mkdir(self, path: str) -> None:
        """Create the directory ``path``; its parent must exist and it must not."""
        ...

    def makedirs(self, path: str) -> None:
        """Create the directory ``path`` and its parents; an existing one is fine."""
        ...

    def create(self, path: str) -> WritableFile:
        """Create the new file ``path`` (it must not exist) and open it for writing."""
        ...

    def open_read(self, path: str) -> ReadableFile:
        """Open the regular file ``path`` for reading (symlinks and FIFOs refused)."""
        ...

    def open_directory(self, path: str) -> DirectoryReader:
        """Open the directory ``path`` for reading its files (``NotADirectoryError``,
        ``FileNotFoundError`` when it is not one)."""
        ...

    def read_bytes(self, path: str, *, max_bytes: int) -> bytes:
        """The bytes of the small regular file ``path``; ``ValueError`` past ``max_bytes``."""
        ...

    def put(
        self,
        path: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> None:
        """Replace the small object ``path`` with ``data``, atomically and durably.

        ``if_absent``: fail with ``FileExistsError`` if it exists (create-only).
        ``if_version``: fail with :class:`PreconditionFailed` unless its current
        version is this one (compare-and-swap).

        Raises only if the object was not written: a store whose request can fail with
        an unknown outcome reads the object back before it raises, since a commit
        removes the files of a save whose manifest put raised.
        """
        ...

    def version(self, path: str) -> str | None:
        """An opaque token that changes with every put of ``path``; None if absent."""
        ...

    def size(self, path: str) -> int:
        """The size of file ``path`` in bytes."""
        ...

    def mtime(self, path: str) -> float:
        """When ``path`` was last written, in seconds since the epoch."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst``; ``dst`` must not exist."""
        ...

    def exchange(self, a: str, b: str) -> bool:
        """Atomically swap ``a`` and ``b`` (both exist); False if the store cannot."""
        ...

    def delete(self, path: str) -> None:
        """Delete the file ``path``; a missing one is not an error."""
        ...

    def remove_tree(self, path: str) -> None:
        """Delete ``path`` and everything below it; a missing path is not an error."""
        ...

    def list_dir(self, path: str) -> list[str]:
        """The entry names in directory ``path`` (a prefix, on an object store).

        Every name that holds something is listed. On an object store a prefix whose
        objects were all deleted a moment ago may still be listed (SeaweedFS keeps such
        folders): callers check what a name holds (``is_checkpoint``), never that it
        is listed.
        """
        ...

    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` (creations, renames) durable."""
        ...

    def lease(self, directory: str) -> Lease:
        """Take the writer lease of ``directory``, or raise ``CheckpointDirLockedError``."""
        ...
