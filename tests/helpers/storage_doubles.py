"""Every ``Storage`` the tests use instead of the plain local disk, in one place.

Each is the real ``LocalStorage`` (``trainhooks.checkpoint.storage``) underneath; they
differ only in what they do around its operations:

* :class:`FaultyStorage`: fails, cuts short or stalls the Nth operation of a save (see
  below) and records every operation (``ops``), so a sweep can first record a clean
  save and then fail each operation in turn.
* :class:`ObservedStorage`: calls ``observe(op)`` before every operation, file writes
  and fsyncs included; :class:`CrashingStorage` ends the process (``os._exit(3)``) at
  the Nth one, for crash tests in forked children.
* :class:`NoExchangeStorage`: no atomic swap, as on macOS, Windows and network file
  systems (re-saves take the rename-aside path of the commit protocol).
* :class:`FullDisk`: the second data file of a save fails to be created with ENOSPC.
* :class:`GatedStorage`: the first operation of a save (``mkdir``) can be held until
  the test releases it, or failed with an ``OSError``; records the directories made.
* :class:`PolicyRecordingStorage`: notes the scheduling policy of each thread that
  creates a file.

The operation a :class:`Fault` chooses (numbered in call order across the whole
storage) instead

* ``"enospc"`` / ``"eio"`` / ``"eacces"``: raises ``OSError`` with that errno and no file
  name, as the kernel does;
* ``"partial"``: (writes only) puts the first half of the bytes on disk, then raises
  ``ENOSPC``, as a disk that fills up mid-write does;
* ``"slow"``: calls ``on_slow()`` (which may block, e.g. on an ``Event``) and then does
  the operation normally.
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
    LocalFile,
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


class ObservedFile(LocalFile):
    """A local file calling ``observe("write")`` / ``observe("fsync")`` before each."""

    def __init__(self, path: str, observe: Callable[[str], None]) -> None:
        super().__init__(path)
        self._observe = observe

    def write(self, buffers: Sequence[memoryview | bytes]) -> None:
        self._observe("write")
        super().write(buffers)

    def fsync(self) -> None:
        self._observe("fsync")
        super().fsync()


class ObservedStorage(LocalStorage):
    """The local disk, calling ``observe(op)`` before every operation of a save."""

    def __init__(self, observe: Callable[[str], None]) -> None:
        self.observe = observe

    def mkdir(self, path: str) -> None:
        self.observe("mkdir")
        super().mkdir(path)

    def create(self, path: str) -> LocalFile:
        self.observe("create")
        return ObservedFile(path, self.observe)

    def rename(self, src: str, dst: str) -> None:
        self.observe("rename")
        super().rename(src, dst)

    def exchange(self, a: str, b: str) -> bool:
        self.observe("exchange")
        return super().exchange(a, b)

    def remove_tree(self, path: str) -> None:
        self.observe("remove_tree")
        super().remove_tree(path)

    def fsync_dir(self, path: str) -> None:
        self.observe("fsync_dir")
        super().fsync_dir(path)


class NoExchangeStorage(LocalStorage):
    """A store without an atomic swap (macOS, Windows, network file systems)."""

    def exchange(self, a: str, b: str) -> bool:
        return False


class CrashingStorage(ObservedStorage):
    """The local disk, ending the process with ``os._exit(3)`` at operation ``crash_at``
    (0-based; -1: never): a crash, nothing after it runs, no cleanup. ``exchange=False``
    makes ``exchange`` report "not supported" (without touching the disk)."""

    def __init__(self, crash_at: int, *, exchange: bool = True) -> None:
        super().__init__(self._op)
        self.crash_at = crash_at
        self.ops = 0
        self._exchange = exchange

    def _op(self, name: str) -> None:
        if self.ops == self.crash_at:
            os._exit(3)
        self.ops += 1

    def exchange(self, a: str, b: str) -> bool:
        self.observe("exchange")
        return self._exchange and LocalStorage.exchange(self, a, b)


class FullDisk(LocalStorage):
    """The local disk, full by the time a save creates its second data file."""

    def create(self, path: str) -> LocalFile:
        if path.endswith(".safetensors") and "00001" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return super().create(path)


class GatedStorage(LocalStorage):
    """The local disk; a save can be held at its first operation, or failed there.

    With ``hold`` set, ``mkdir`` sets ``entered`` and waits (20 s at most) for the test
    to set ``release``; with ``error`` set, it then raises that error. The names of the
    directories made are recorded in ``made``.
    """

    def __init__(self) -> None:
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self.error: OSError | None = None
        self.made: list[str] = []

    def mkdir(self, path: str) -> None:
        if self.hold:
            self.entered.set()
            assert self.release.wait(20), "the test never released the held save"
        if self.error is not None:
            raise self.error
        self.made.append(os.path.basename(path))
        super().mkdir(path)


class PolicyRecordingStorage(LocalStorage):
    """The local disk, noting the scheduling policy of each thread that creates a file."""

    def __init__(self) -> None:
        super().__init__()
        self.policies: dict[str, int] = {}

    def create(self, path: str) -> LocalFile:
        self.policies[os.path.basename(path)] = os.sched_getscheduler(0)
        return super().create(path)
