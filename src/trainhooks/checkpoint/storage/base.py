"""Where checkpoint bytes go: the ``Storage`` Protocol.

The commit protocol (``checkpoint/saving/write.py``) performs every disk operation of a
save through a ``Storage``, so a wrapper can count, delay or fail any single one of
them (fault injection) and a remote store can replace the local disk.

Paths are plain strings; a ``Storage`` never interprets them beyond passing them to
the file system.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["Storage", "WritableFile"]


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
class Storage(Protocol):
    """The file-system operations that writing, committing and deleting checkpoints need.

    Example:
        >>> from trainhooks.checkpoint.storage import LocalStorage
        >>> storage: Storage = LocalStorage()
        >>> storage.exists("/nonexistent/path")
        False
    """

    def exists(self, path: str) -> bool:
        """True if ``path`` exists (file or directory, symlinks not followed)."""
        ...

    def is_dir(self, path: str) -> bool:
        """True if ``path`` is a directory (symlinks not followed)."""
        ...

    def mkdir(self, path: str) -> None:
        """Create the directory ``path``; its parent must exist and it must not."""
        ...

    def create(self, path: str) -> WritableFile:
        """Create the new file ``path`` (it must not exist) and open it for writing."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically rename ``src`` to ``dst``; ``dst`` must not exist."""
        ...

    def exchange(self, a: str, b: str) -> bool:
        """Atomically swap ``a`` and ``b`` (both exist); False if the store cannot."""
        ...

    def remove_tree(self, path: str) -> None:
        """Delete ``path`` and everything below it; a missing path is not an error."""
        ...

    def list_dir(self, path: str) -> list[str]:
        """The entry names in directory ``path``."""
        ...

    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` (creations, renames) durable."""
        ...
