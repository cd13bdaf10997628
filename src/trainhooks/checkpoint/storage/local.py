"""``LocalStorage``: checkpoints on the local file system."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import secrets
import shutil
import stat
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from trainhooks.checkpoint.storage.base import PreconditionFailed
from trainhooks.checkpoint.storage.local_file import LocalFile
from trainhooks.checkpoint.storage.lock import WriterLock, acquire_writer_lock

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FADV_SEQUENTIAL = getattr(os, "POSIX_FADV_SEQUENTIAL", 2)
# madvise(MADV_POPULATE_READ) (Linux 5.14): fault a range of a mapping in with one call,
# reading what is not cached with large reads. Python's mmap module lacks the constant.
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)

__all__ = ["LocalStorage"]


class LocalStorage:
    """The local file system, with an atomic directory swap where the kernel offers one.

    ``exchange`` uses Linux's ``renameat2(RENAME_EXCHANGE)`` (kernel 3.15+, glibc 2.28+;
    ext4, xfs, btrfs, tmpfs). Elsewhere it returns False and the commit protocol falls
    back to renaming the old directory aside first (see ``commit.py``).

    Small objects (the state file) are put through a temporary file that is fsynced
    and renamed into place; a create-only put links it into place instead (``link``
    fails if the name exists), and a compare-and-swap holds an ``flock`` on the
    directory while it compares and renames.

    Args:
      direct_io: let files larger than one chunk be written with ``O_DIRECT`` where
        the disk allows it (see ``local_file.py`` for when); False writes every file
        through the page cache.
      rename: publish checkpoints by renaming a staging directory into place (True),
        or, as on an object store, by writing the manifest last (False).

    Example:
        >>> storage = LocalStorage()
        >>> storage.list_dir("/")  # doctest: +SKIP
        ['bin', 'etc', ...]
    """

    direct_io = True  # class defaults too: subclasses need not call __init__
    can_rename = True

    def __init__(self, *, direct_io: bool = True, rename: bool = True) -> None:
        self.direct_io = direct_io
        self.can_rename = rename

    def __repr__(self) -> str:
        return f"LocalStorage(direct_io={self.direct_io}, rename={self.can_rename})"

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path) and not os.path.islink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def create(self, path: str) -> LocalFile:
        return LocalFile(path, direct=self.direct_io)

    def open_read(self, path: str) -> LocalReadFile:
        return LocalReadFile(path)

    def open_directory(self, path: str) -> LocalDirectoryReader:
        return LocalDirectoryReader(path)

    def read_bytes(self, path: str, *, max_bytes: int) -> bytes:
        # O_NONBLOCK: a FIFO planted under the name must not block the open.
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError(f"{path} is not a regular file.")
            chunks = []
            remaining = max_bytes + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise ValueError(f"{path} is larger than {max_bytes} bytes.")
        return data

    def put(
        self,
        path: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> None:
        directory = os.path.dirname(path) or os.curdir
        # "<file>.tmp-<12 hex>" is the leftover pattern that commit.remove_leftovers cleans up.
        tmp = f"{path}.tmp-{secrets.token_hex(6)}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                os.link(tmp, path)  # fails with EEXIST: create-only, and complete at once
                os.remove(tmp)
            elif if_version is not None:
                with _directory_locked(directory):
                    if self.version(path) != if_version:
                        raise PreconditionFailed(
                            errno.EAGAIN, f"{path} changed since version {if_version}", path
                        )
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
        self.fsync_dir(directory)

    def version(self, path: str) -> str | None:
        try:
            info = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        # Every put renames a new inode into place, so the inode number alone changes;
        # size and time guard against a writer that rewrote the file in place.
        return f"{info.st_ino}-{info.st_mtime_ns}-{info.st_size}"

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def mtime(self, path: str) -> float:
        return os.stat(path).st_mtime_ns / 1e9

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def lease(self, directory: str) -> WriterLock:
        return acquire_writer_lock(directory)

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


class LocalDirectoryReader:
    """A directory held open by descriptor: its files are opened relative to it.

    A re-save that swaps in a new directory (rename commit) leaves this one reading the
    old files; one that rewrites the manifest in place (manifest-last commit) changes
    the manifest's version. Either way :meth:`replaced` says so.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        self._manifest = self._manifest_version(self.fd)

    @staticmethod
    def _manifest_version(dir_fd: int) -> tuple[int, int, int] | None:
        from trainhooks.checkpoint.storage.commit import MANIFEST_NAME

        try:
            info = os.stat(MANIFEST_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return None
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def open_read(self, name: str) -> LocalReadFile:
        if self.fd is None:
            raise ValueError(f"{self.path} is closed")
        return LocalReadFile(os.path.join(self.path, name), dir_fd=self.fd, name=name)

    def replaced(self) -> bool:
        if self.fd is None:
            return False
        opened = os.fstat(self.fd)
        try:
            now = os.stat(self.path)
        except OSError:
            return False
        if (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino):
            return True
        return self._manifest_version(self.fd) != self._manifest

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class LocalReadFile:
    """A regular file opened for reading; :meth:`view` memory-maps it.

    Opened without following a symlink and non-blocking (a FIFO planted in place of a
    file must not block); anything but a regular file is refused.
    """

    def __init__(self, path: str, *, dir_fd: int | None = None, name: str | None = None) -> None:
        self.path = path
        flags = os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC
        fd = os.open(path if name is None else name, flags, dir_fd=dir_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
        self.fd: int | None = fd
        self.size = info.st_size
        self._map: mmap.mmap | None = None
        self._populate = _MADV_POPULATE_READ is not None

    def view(self) -> memoryview:
        if self._map is None:
            if self.fd is None:
                raise ValueError(f"{self.path} is closed")
            self._map = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ)
        return memoryview(self._map)

    def advise_sequential(self, start: int, length: int) -> None:
        """Tell the kernel that ``[start, start + length)`` will be read in order."""
        if hasattr(os, "posix_fadvise") and self.fd is not None:
            os.posix_fadvise(self.fd, start, length, _FADV_SEQUENTIAL)

    def prefetch(self, start: int, length: int) -> None:
        """Start reading ``[start, start + length)`` into the page cache; returns at once.

        ``posix_fadvise(WILLNEED)``: a hint, so a kernel or file system without it (an
        error) changes nothing.
        """
        if hasattr(os, "posix_fadvise") and self.fd is not None and length > 0:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_WILLNEED)

    def populate(self, start: int, length: int) -> None:
        """Make ``[start, start + length)`` of :meth:`view`'s mapping resident: a hint.

        One ``madvise(MADV_POPULATE_READ)`` reads what the page cache lacks (in large
        requests) and maps every page of the range, so reading the view faults no more.
        Does nothing where the kernel lacks it.
        """
        if not self._populate or self._map is None or length <= 0:
            return
        aligned = start - start % mmap.PAGESIZE
        length = min(length + start - aligned, self.size - aligned)
        if length <= 0:
            return
        try:
            self._map.madvise(_MADV_POPULATE_READ, aligned, length)  # type: ignore[arg-type]
        except (OSError, ValueError, OverflowError):
            self._populate = False  # an older kernel (EINVAL): plain page faults instead

    def readinto(self, position: int, buffer: memoryview) -> int:
        if self.fd is None:
            raise ValueError(f"{self.path} is closed")
        return os.preadv(self.fd, [buffer], position)

    def readinto_many(self, position: int, buffers: Sequence[memoryview]) -> int:
        """Read into ``buffers`` in order from ``position`` on (one ``preadv``); the
        bytes read, 0 at the end of the file."""
        if self.fd is None:
            raise ValueError(f"{self.path} is closed")
        return os.preadv(self.fd, buffers, position)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view handed out still uses it
                self._map.close()
            self._map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _directory_locked(directory: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` itself, for a compare-and-swap."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


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
