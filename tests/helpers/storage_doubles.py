"""Every ``Storage`` the tests use instead of the plain local disk, in one place.

Each is the real ``LocalStorage`` (``trainhooks.checkpoint.storage``) underneath; they
differ only in what they do around its operations:

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
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence

from trainhooks.checkpoint.storage import LocalFile, LocalStorage


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
