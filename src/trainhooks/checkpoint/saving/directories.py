"""The checkpoint directories a ``Saver`` writes into, and the background saves in them.

A saver claims a directory on its first save there (:class:`DirectoryClaims`): it takes
the directory's writer lock (``checkpoint/storage/lock.py``), so that a second process saving
into it fails at once, and removes the temporary directories a crashed save left. The
claim lasts until ``Saver.close``, or until the saver is garbage-collected.

Within one process several savers may write into one directory (the lock is shared by
the process). :func:`wait_for_saves_into` lets a restore, or a new claim, first wait
for the background saves of this process that are writing there: a restore then reads
the checkpoint this process saved last, and leftovers removal never deletes a save in
progress.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

from trainhooks.checkpoint.saving.background import BackgroundWriter
from trainhooks.checkpoint.storage import Lease, storage_for
from trainhooks.checkpoint.storage.commit import remove_leftovers

__all__ = ["DirectoryClaims", "track_background_writer", "wait_for_saves_into"]

# Writers of background saves, whose in-flight label is the checkpoint prefix.
_BACKGROUND_WRITERS: weakref.WeakSet[BackgroundWriter[Any]] = weakref.WeakSet()


class DirectoryClaims:
    """The directories one saver writes into, each with its writer lock.

    Example:
        >>> claims = DirectoryClaims()
        >>> claims.claim("/tmp/run")  # doctest: +SKIP
        >>> claims.release_all()
    """

    def __init__(self) -> None:
        self._locks: dict[str, Lease] = {}
        # A saver dropped without close() must not keep the directory locked; at exit
        # the kernel drops the lock with the process.
        weakref.finalize(self, _release, self._locks).atexit = False

    def claim(self, directory: str) -> None:
        """On the first call for ``directory``: take its writer lock, remove crash leftovers.

        Args:
          directory: an existing checkpoint directory.

        Raises:
          CheckpointDirLockedError: another process is saving into ``directory``.
        """
        key = os.path.abspath(directory)
        if key in self._locks:
            return
        lock = storage_for(directory).lease(directory)
        try:
            # A save of this process (another saver's) may be in flight there: its
            # temporary directory is not a leftover.
            wait_for_saves_into(directory)
            remove_leftovers(directory)
        except BaseException:
            lock.release()
            raise
        self._locks[key] = lock

    def release_all(self) -> None:
        """Release every writer lock; the next :meth:`claim` takes it again."""
        _release(self._locks)


def _release(locks: dict[str, Lease]) -> None:
    for lock in locks.values():
        lock.release()
    locks.clear()


def track_background_writer(writer: BackgroundWriter[Any]) -> None:
    """Make :func:`wait_for_saves_into` wait for ``writer``'s saves (labelled by prefix)."""
    _BACKGROUND_WRITERS.add(writer)


def wait_for_saves_into(directory: str | os.PathLike[str]) -> None:
    """Block until no tracked background save of this process writes into ``directory``.

    A failed save's error stays with its writer, for the saver's ``wait`` or
    ``poll_committed``.

    Example:
        >>> wait_for_saves_into("/tmp/run")
    """
    target = os.path.realpath(os.fspath(directory) or os.curdir)
    for writer in list(_BACKGROUND_WRITERS):
        prefix = writer.in_flight
        if prefix is not None and os.path.realpath(os.path.dirname(prefix) or os.curdir) == target:
            writer.wait(raise_error=False)
