"""Retention: which checkpoints a ``Saver`` keeps, as TF's ``Saver`` decides it.

``max_to_keep`` keeps the newest checkpoints; ``keep_checkpoint_every_n_hours``
additionally keeps, for good, one checkpoint per that many hours of training. The
bookkeeping is a list of ``(prefix, time saved)`` pairs, oldest first, which a restart
recovers from the state file (``docs/semantics.md``, "Saver: names and retention").

A commit records its checkpoint (:meth:`Retention.record`), writes the state file from
:attr:`Retention.last_checkpoints`, and only then deletes what fell out
(:meth:`Retention.delete_dropped`), so the state file never names a deleted checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from trainhooks._clock import Clock, wall_clock
from trainhooks.checkpoint.management.state_file import (
    checkpoint_exists,
    get_checkpoint_mtimes,
    inside_by_name,
    remove_checkpoint,
)

__all__ = ["Retention"]

logger = logging.getLogger(__name__)

#: TensorFlow's default ``keep_checkpoint_every_n_hours``: in effect, never.
DEFAULT_KEEP_HOURS = 10000.0


class Retention:
    """The ``max_to_keep`` / ``keep_checkpoint_every_n_hours`` bookkeeping of one Saver.

    Args:
      max_to_keep: how many recent checkpoints to keep; None or 0 keeps all (and
        tracks none).
      keep_checkpoint_every_n_hours: keep one checkpoint per this many hours for good.
      clock: the time source for the saved-at times and the keep deadline.

    Example:
        >>> retention = Retention(max_to_keep=1)
        >>> retention.record("/tmp/run/m-1")
        >>> retention.record("/tmp/run/m-2")
        >>> retention.last_checkpoints
        ['/tmp/run/m-2']
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = DEFAULT_KEEP_HOURS,
        *,
        clock: Clock = wall_clock,
    ) -> None:
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 0):
            raise ValueError(
                f"max_to_keep must be a non-negative integer, got {max_to_keep!r}; pass None "
                "or 0 to keep every checkpoint."
            )
        self.max_to_keep = max_to_keep
        self.keep_checkpoint_every_n_hours = float(keep_checkpoint_every_n_hours)
        self._clock = clock
        self._last: list[tuple[str, float]] = []
        self._to_delete: list[tuple[str, float]] = []
        self._next_keep_time = clock() + self.keep_checkpoint_every_n_hours * 3600
        self._keep_clock_resumed = False

    @property
    def last_checkpoints(self) -> list[str]:
        """The prefixes still tracked, oldest first."""
        return [path for path, _ in self._last]

    def set_last_checkpoints_with_time(self, pairs: Sequence[tuple[str, float]]) -> None:
        """Replace the bookkeeping with ``(prefix, seconds since the epoch)`` pairs, oldest first."""
        if isinstance(pairs, (str, bytes)):
            raise TypeError("last_checkpoints_with_time must be a list of (path, time) pairs.")
        self._last = [(os.fspath(p), float(t)) for p, t in pairs]

    @property
    def last_preserved(self) -> float:
        """Where the ``keep_checkpoint_every_n_hours`` clock started: the previous keep
        deadline (the state file's ``last_preserved_timestamp``)."""
        return self._next_keep_time - self.keep_checkpoint_every_n_hours * 3600

    def resume_keep_clock(self, last_preserved: float | None) -> None:
        """Continue the ``keep_checkpoint_every_n_hours`` clock of an earlier run.

        The next checkpoint kept for good follows from ``last_preserved`` (the state
        file's ``last_preserved_timestamp``), not from this process's start, so a job
        restarted more often than every N hours still keeps one checkpoint per N hours.
        Only moves the deadline earlier: a clock already resumed is not reset.
        """
        if last_preserved and not self._keep_clock_resumed:
            period = self.keep_checkpoint_every_n_hours * 3600
            # A job that stood still for days resumes at most one period back, not days
            # back: otherwise every checkpoint until the clock caught up would be kept.
            # (TF's deadline steps on from the previous one, so one catch-up keep remains.)
            resumed = max(float(last_preserved) + period, self._clock() - period)
            self._next_keep_time = min(self._next_keep_time, resumed)
        self._keep_clock_resumed = True

    @property
    def keeps_periodically(self) -> bool:
        """True when ``keep_checkpoint_every_n_hours`` was set below TF's default of 10000."""
        return self.keep_checkpoint_every_n_hours < DEFAULT_KEEP_HOURS

    def recover(self, checkpoint_paths: Sequence[str]) -> None:
        """Rebuild the bookkeeping from checkpoints on disk, timed by their file times.

        Checkpoints that no longer exist are left out.
        """
        with_times = []
        for path in checkpoint_paths:
            mtimes = get_checkpoint_mtimes([path])
            if mtimes:
                with_times.append((os.fspath(path), mtimes[0]))
        self.set_last_checkpoints_with_time(with_times)

    def reconcile(self, listed: Sequence[str], directory: str) -> None:
        """Agree with what the state file of ``directory`` lists, before recording a save.

        Several savers may save into one directory (a hook's own and the session's
        default one, or a run restarted without ``recover_last_checkpoints``): each
        adopts the checkpoints another listed there, timed by their files, and forgets
        the ones that no longer exist, so that the state file never lists a deleted
        checkpoint and retention never forgets a committed one. Only committed
        checkpoints inside ``directory`` are adopted; a state file naming the same
        checkpoint under another directory (a moved run) names the one inside.
        """
        if not self.max_to_keep:
            return
        # One checkpoint may be spelled "model.ckpt-1" here and "./model.ckpt-1" there.
        tracked = {os.path.normpath(p) for p, _ in self._last}
        kept = [(p, t) for p, t in self._last if checkpoint_exists(p)]
        adopted = []
        for path in listed:
            inside = inside_by_name(path, directory)
            if inside is None or os.path.normpath(inside) in tracked:
                continue
            if not checkpoint_exists(inside):
                continue
            mtimes = get_checkpoint_mtimes([inside])
            if mtimes:
                adopted.append((inside, mtimes[0]))
                tracked.add(os.path.normpath(inside))
        if adopted or len(kept) != len(self._last):
            # Order by the checkpoints' file times: the times this saver recorded come
            # from its clock, which need not be the wall clock the files were stamped by.
            self._last = [
                entry for _, entry in sorted((_file_time(p, t), (p, t)) for p, t in kept + adopted)
            ]

    def record(self, prefix: str) -> None:
        """Track a newly committed checkpoint; the oldest beyond ``max_to_keep`` is dropped."""
        if not self.max_to_keep:
            return
        # A re-saved path moves to the end (it is the newest again).
        self._last = [e for e in self._last if os.path.normpath(e[0]) != os.path.normpath(prefix)]
        self._last.append((prefix, self._clock()))
        # More than one beyond max_to_keep only after a recovery that found more.
        while len(self._last) > self.max_to_keep:
            dropped = self._last.pop(0)
            if dropped[1] > self._next_keep_time:
                # Kept for good; the next deadline steps on from this one, not from saved_at.
                self._next_keep_time += self.keep_checkpoint_every_n_hours * 3600
            else:
                self._to_delete.append(dropped)

    def delete_dropped(self) -> None:
        """Delete the oldest dropped checkpoint, unless ``keep_checkpoint_every_n_hours`` keeps it.

        Call after the state file no longer lists it. Failures are logged, never raised:
        the save that dropped it has already committed.
        """
        while self._to_delete:
            prefix, _ = self._to_delete.pop(0)
            try:
                remove_checkpoint(prefix)
            except Exception as e:  # retention must never fail a save that has committed
                logger.warning("Ignoring: %s", e)


def _file_time(prefix: str, otherwise: float) -> float:
    mtimes = get_checkpoint_mtimes([prefix])
    return mtimes[0] if mtimes else otherwise
