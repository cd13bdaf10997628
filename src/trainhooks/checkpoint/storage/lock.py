"""An advisory writer lock on a checkpoint directory: one writing process at a time.

Two processes saving into the same directory would race on the state file and on
retention, and one's ``remove_leftovers`` would delete the other's save in progress.
The first process that writes takes an exclusive ``fcntl.flock`` on
``<dir>/.trainhooks-writer.lock`` and keeps it until it is done; another process that
tries gets :class:`CheckpointDirLockedError` at once (the lock never blocks), naming
the directory and the holder's pid. Readers (restore, ``latest_checkpoint``,
``load_checkpoint``) never take it.

Within one process the lock is shared: every :func:`acquire_writer_lock` on the same
directory returns a handle on the one ``flock``, released when the last handle is. The
kernel drops the lock when the holding process dies, even by SIGKILL, so a crash never
leaves a directory locked. A forked child does not inherit the parent's hold.

Where ``fcntl`` is missing (Windows) the lock is a no-op.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
from types import TracebackType

from trainhooks import errors

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "LOCK_FILE_NAME",
    "CheckpointDirLockedError",
    "WriterLock",
    "acquire_writer_lock",
    "lock_holder",
]

logger = logging.getLogger(__name__)

#: The lock file's name inside a checkpoint directory.
LOCK_FILE_NAME = ".trainhooks-writer.lock"
# The holder writes "pid host\n"; anything longer is not ours and is not read.
_MAX_HOLDER_BYTES = 256
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class CheckpointDirLockedError(errors.Error):
    """Another process is writing checkpoints into this directory.

    Attributes:
      directory: the checkpoint directory.
      holder_pid: the pid of the process holding the lock, or None if unknown.
    """

    def __init__(self, message: str, directory: str, holder_pid: int | None) -> None:
        super().__init__(message)
        self.directory = directory
        self.holder_pid = holder_pid


class _Held:
    """The process's one open, locked lock file for a directory, with its handle count."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.count = 0


_registry: dict[tuple[int, int], _Held] = {}
# Re-entrant: a garbage-collected saver's finalizer may release a lock from inside
# acquire_writer_lock on the same thread.
_registry_lock = threading.RLock()


def _forget_after_fork() -> None:
    # The child shares the parent's open file description, hence its flock; closing
    # our copy does not release the parent's lock. The child must take its own.
    global _registry_lock
    for held in _registry.values():
        try:
            os.close(held.fd)
        except OSError:
            pass
    _registry.clear()
    _registry_lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class WriterLock:
    """A handle on the writer lock of one checkpoint directory; release it once.

    Use it as a context manager, or call :meth:`release`. Releasing twice is harmless.

    Example:
        >>> with acquire_writer_lock("/tmp/run"):  # doctest: +SKIP
        ...     saver.save(sess, "/tmp/run/model.ckpt", global_step=1)
    """

    def __init__(self, directory: str, key: tuple[int, int] | None) -> None:
        self.directory = directory
        self._key = key
        self._released = False

    @property
    def released(self) -> bool:
        """True once :meth:`release` was called."""
        return self._released

    def release(self) -> None:
        """Give up this handle; the lock is freed when the process's last handle goes."""
        if self._released:
            return
        self._released = True
        if self._key is None:
            return
        with _registry_lock:
            held = _registry.get(self._key)
            if held is None:
                return
            held.count -= 1
            if held.count == 0:
                del _registry[self._key]
                # Closing the only descriptor drops the flock.
                os.close(held.fd)

    def __enter__(self) -> WriterLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"WriterLock({self.directory!r}, {state})"


def acquire_writer_lock(directory: str | os.PathLike[str]) -> WriterLock:
    """Take the writer lock of checkpoint directory ``directory``, without waiting.

    Args:
      directory: an existing checkpoint directory.

    Returns:
      a :class:`WriterLock` handle; call ``release()`` (or use ``with``) when done.

    Raises:
      CheckpointDirLockedError: another process holds the lock; the message names the
        directory and, when known, the holder's pid.
      NotFoundError: ``directory`` does not exist.

    Example:
        >>> lock = acquire_writer_lock("/tmp/run")  # doctest: +SKIP
        >>> lock.release()  # doctest: +SKIP
    """
    directory = os.fspath(directory)
    if fcntl is None:
        return WriterLock(directory, None)
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        raise errors.NotFoundError(
            f"Checkpoint directory {directory} does not exist; create it before saving."
        ) from None
    key = (info.st_dev, info.st_ino)
    with _registry_lock:
        held = _registry.get(key)
        if held is None:
            held = _lock_new(directory)
            _registry[key] = held
        held.count += 1
    return WriterLock(directory, key)


def _lock_new(directory: str) -> _Held:
    path = os.path.join(directory, LOCK_FILE_NAME)
    # Held open read-only, so that holding the lock never keeps a file system from being
    # remounted read-only; the holder's pid is written through a short-lived descriptor.
    flags = os.O_RDONLY | os.O_CREAT | _O_NOFOLLOW | _O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise errors.InvalidArgumentError(
                f"{path} is a symbolic link; a checkpoint directory's lock file must be a "
                "plain file. Remove the link."
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise errors.InvalidArgumentError(
            f"{path} is not a regular file; remove it so that the writer lock can be taken."
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        pid = lock_holder(directory)
        who = f"process {pid}" if pid is not None else "another process"
        raise CheckpointDirLockedError(
            f"Checkpoint directory {directory} is locked for writing by {who} "
            f"({path}). Only one process may save into a checkpoint directory: stop the "
            "other process, or save into another directory (readers need no lock).",
            directory,
            pid,
        ) from None
    _record_holder(path)
    logger.debug("Took the writer lock of %s.", directory)
    return _Held(fd, path)


def _record_holder(path: str) -> None:
    try:
        wfd = os.open(path, os.O_WRONLY | _O_NOFOLLOW | _O_NONBLOCK)
    except OSError:
        return  # the record only improves error messages
    try:
        os.ftruncate(wfd, 0)
        os.pwrite(wfd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass
    finally:
        os.close(wfd)


def lock_holder(directory: str | os.PathLike[str]) -> int | None:
    """The pid recorded by the last process that took ``directory``'s writer lock.

    The record may be stale (that process may have exited); it names the holder only
    while the lock is held.

    Returns:
      the pid, or None when there is no lock file or it cannot be read.

    Example:
        >>> lock_holder("/nonexistent")
    """
    path = os.path.join(os.fspath(directory), LOCK_FILE_NAME)
    try:
        # Non-blocking: a FIFO planted under the lock file's name must not hang us.
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        raw = os.read(fd, _MAX_HOLDER_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)
    first = raw.split(maxsplit=1)[:1]
    return int(first[0]) if first and first[0].isdigit() and len(first[0]) < 12 else None
