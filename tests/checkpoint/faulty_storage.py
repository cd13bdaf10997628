"""A ``Storage`` for tests that fails, cuts short or stalls any single operation of a save.

It wraps the real ``LocalStorage`` (``trainhooks.checkpoint.storage.base``): every call goes
to the disk, except the one chosen by a :class:`Fault`, which instead

* ``"enospc"`` / ``"eio"`` / ``"eacces"``: raises ``OSError`` with that errno and no file
  name, as the kernel does;
* ``"partial"``: (writes only) puts the first half of the bytes on disk, then raises
  ``ENOSPC``, as a disk that fills up mid-write does;
* ``"slow"``: calls ``on_slow()`` (which may block, e.g. on an ``Event``) and then does
  the operation normally.

Operations are numbered in call order across the whole storage (``ops`` records them),
so a sweep can first record a clean save and then fail each operation in turn.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from trainhooks.checkpoint.storage import (
    DirectoryReader,
    Lease,
    LocalStorage,
    ReadableFile,
    Storage,
    WritableFile,
)

KINDS = ("enospc", "eio", "eacces", "partial", "slow")
_ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO, "eacces": errno.EACCES}


@dataclass(frozen=True)
class Fault:
    """Make operation number ``at`` (0-based, in call order) fail in the way ``kind`` says."""

    at: int
    kind: str = "enospc"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")


class InjectedFault(OSError):
    """Raised by :class:`FaultyStorage`; an ``OSError`` like the real ones."""


class _FaultyFile:
    def __init__(self, storage: FaultyStorage, inner: WritableFile, path: str) -> None:
        self._storage = storage
        self._inner = inner
        self.path = path

    def write(self, buffers: Sequence[memoryview | bytes]) -> None:
        fault = self._storage._next("write", self.path)
        if fault is not None and fault.kind == "partial":
            data = b"".join(bytes(b) for b in buffers)
            self._inner.write([data[: len(data) // 2]])
            raise InjectedFault(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._storage._apply(fault)
        self._inner.write(buffers)

    def fsync(self) -> None:
        self._storage._apply(self._storage._next("fsync", self.path))
        self._inner.fsync()

    def close(self) -> None:
        self._inner.close()  # never fails: a close error would hide the real one


class FaultyStorage:
    """``LocalStorage`` with one injected fault (or none: then it only records).

    Args:
      fault: the operation to fail, or None.
      on_slow: called for a ``"slow"`` fault before the operation runs.
      exchange: False makes ``exchange`` report "not supported", so re-saves take the
        rename-aside path of the commit protocol.

    Example:
        >>> storage = FaultyStorage(Fault(at=3, kind="eio"))
        >>> # write_checkpoint(prefix, flat, global_step=1, storage=storage) raises EIO
    """

    def __init__(
        self,
        fault: Fault | None = None,
        *,
        on_slow: Callable[[], None] | None = None,
        exchange: bool = True,
    ) -> None:
        self._inner: Storage = LocalStorage()
        self._fault = fault
        self._on_slow = on_slow
        self._exchange = exchange
        self._lock = threading.Lock()  # data files are written by several threads
        self.ops: list[tuple[str, str]] = []
        self.fired: tuple[str, str] | None = None

    def _next(self, op: str, path: str) -> Fault | None:
        with self._lock:
            index = len(self.ops)
            self.ops.append((op, path))
            if self._fault is not None and self._fault.at == index:
                self.fired = (op, path)
                return self._fault
        return None

    def _apply(self, fault: Fault | None) -> None:
        if fault is None:
            return
        if fault.kind == "slow":
            if self._on_slow is not None:
                self._on_slow()
            return
        code = _ERRNO.get(fault.kind, errno.ENOSPC)
        raise InjectedFault(code, os.strerror(code))

    def exists(self, path: str) -> bool:
        return self._inner.exists(path)

    def is_dir(self, path: str) -> bool:
        return self._inner.is_dir(path)

    def list_dir(self, path: str) -> list[str]:
        return self._inner.list_dir(path)

    def mkdir(self, path: str) -> None:
        self._apply(self._next("mkdir", path))
        self._inner.mkdir(path)

    def create(self, path: str) -> WritableFile:
        self._apply(self._next("create", path))
        return _FaultyFile(self, self._inner.create(path), path)

    def rename(self, src: str, dst: str) -> None:
        self._apply(self._next("rename", dst))
        self._inner.rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        self._apply(self._next("exchange", b))
        return self._exchange and self._inner.exchange(a, b)

    def remove_tree(self, path: str) -> None:
        self._apply(self._next("remove_tree", path))
        self._inner.remove_tree(path)

    def fsync_dir(self, path: str) -> None:
        self._apply(self._next("fsync_dir", path))
        self._inner.fsync_dir(path)

    # The rest of the Storage interface: reads pass through; writes and deletes can fail.
    can_rename = True

    def makedirs(self, path: str) -> None:
        self._apply(self._next("makedirs", path))
        self._inner.makedirs(path)

    def open_read(self, path: str) -> ReadableFile:
        return self._inner.open_read(path)

    def open_directory(self, path: str) -> DirectoryReader:
        return self._inner.open_directory(path)

    def read_bytes(self, path: str, *, max_bytes: int) -> bytes:
        return self._inner.read_bytes(path, max_bytes=max_bytes)

    def put(
        self, path: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None
    ) -> None:
        self._apply(self._next("put", path))
        self._inner.put(path, data, if_absent=if_absent, if_version=if_version)

    def version(self, path: str) -> str | None:
        return self._inner.version(path)

    def size(self, path: str) -> int:
        return self._inner.size(path)

    def mtime(self, path: str) -> float:
        return self._inner.mtime(path)

    def delete(self, path: str) -> None:
        self._apply(self._next("delete", path))
        self._inner.delete(path)

    def lease(self, directory: str) -> Lease:
        return self._inner.lease(directory)
