"""Where checkpoint bytes go: the ``Storage`` Protocol and ``LocalStorage``.

The commit protocol (``checkpoint/commit.py``) performs every disk operation of a
save through a ``Storage``, so a wrapper can count, delay or fail any single one of
them (fault injection) and a remote store can replace the local disk.

Paths are plain strings; a ``Storage`` never interprets them beyond passing them to
the file system.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["LocalFile", "LocalStorage", "Storage", "WritableFile"]

# Linux writes at most this many bytes per call and takes at most IOV_MAX buffers.
_MAX_WRITE = 0x7FFFF000
_IOV_MAX = 1024


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


class LocalFile:
    """A file on the local disk, written with ``os.writev`` straight from the caller's buffers."""

    def __init__(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        self.path = path
        self._fd: int | None = os.open(path, flags, 0o644)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path} is already closed")
        return self._fd

    def write(self, buffers: Sequence[memoryview | bytes]) -> None:
        fd = self._require_fd()
        views = [b if type(b) is memoryview else memoryview(b) for b in buffers]
        while views:
            batch = views[:_IOV_MAX]
            written = os.writev(fd, batch) if len(batch) > 1 else os.write(fd, batch[0])
            # Drop what went out; keep the unwritten tail of a short write.
            done = 0
            while done < len(batch) and written >= batch[done].nbytes:
                written -= batch[done].nbytes
                done += 1
            if done < len(batch):
                batch[done] = batch[done].cast("B")[written:]
            views = batch[done:] + views[len(batch) :]

    def fsync(self) -> None:
        os.fsync(self._require_fd())

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class LocalStorage:
    """The local file system, with an atomic directory swap where the kernel offers one.

    ``exchange`` uses Linux's ``renameat2(RENAME_EXCHANGE)`` (kernel 3.15+, glibc 2.28+;
    ext4, xfs, btrfs, tmpfs). Elsewhere it returns False and the commit protocol falls
    back to renaming the old directory aside first (see ``commit.py``).

    Example:
        >>> storage = LocalStorage()
        >>> storage.list_dir("/")  # doctest: +SKIP
        ['bin', 'etc', ...]
    """

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path) and not os.path.islink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def create(self, path: str) -> LocalFile:
        return LocalFile(path)

    def rename(self, src: str, dst: str) -> None:
        if os.path.lexists(dst):  # os.rename would silently replace an empty directory
            raise FileExistsError(errno.EEXIST, "rename target exists", dst)
        os.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        return _rename_exchange(a, b)

    def remove_tree(self, path: str) -> None:
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)

    def list_dir(self, path: str) -> list[str]:
        return os.listdir(path)

    def fsync_dir(self, path: str) -> None:
        try:
            fd = os.open(path or os.curdir, os.O_RDONLY)
        except OSError:  # platforms where a directory cannot be opened (Windows)
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2: Any = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
        _renameat2.argtypes += [ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (AttributeError, OSError):  # glibc older than 2.28, or musl without it
        _renameat2 = None


def _rename_exchange(a: str, b: str) -> bool:
    """Swap two paths atomically; False where the kernel or file system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", a, None, b)
