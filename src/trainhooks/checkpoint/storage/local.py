"""``LocalStorage``: checkpoints on the local file system."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
from typing import Any

from trainhooks.checkpoint.storage.local_file import LocalFile

__all__ = ["LocalStorage"]


class LocalStorage:
    """The local file system, with an atomic directory swap where the kernel offers one.

    ``exchange`` uses Linux's ``renameat2(RENAME_EXCHANGE)`` (kernel 3.15+, glibc 2.28+;
    ext4, xfs, btrfs, tmpfs). Elsewhere it returns False and the commit protocol falls
    back to renaming the old directory aside first (see ``commit.py``).

    Args:
      direct_io: let files larger than one chunk be written with ``O_DIRECT`` where
        the disk allows it (see ``local_file.py`` for when); False writes every file
        through the page cache.

    Example:
        >>> storage = LocalStorage()
        >>> storage.list_dir("/")  # doctest: +SKIP
        ['bin', 'etc', ...]
    """

    direct_io = True  # a class default too: subclasses need not call __init__

    def __init__(self, *, direct_io: bool = True) -> None:
        self.direct_io = direct_io

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path) and not os.path.islink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def create(self, path: str) -> LocalFile:
        return LocalFile(path, direct=self.direct_io)

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
