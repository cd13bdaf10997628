"""``Saver``: TensorFlow's ``tf.compat.v1.train.Saver`` over a session's state.

A save names the checkpoint (``<save_path>-<step>``), flattens the state into tensors,
writes and commits a checkpoint directory at that prefix, then records it: the state
file is replaced and retention (``max_to_keep``, ``keep_checkpoint_every_n_hours``)
deletes what it no longer keeps. The steps are separate methods so that a background
save can take the snapshot on the training thread and run the rest elsewhere.

The first save into a directory takes that directory's writer lock
(``checkpoint/storage/lock.py``) and removes what crashed saves left there; the saver keeps the
lock until :meth:`Saver.close`, so a second process saving into the directory fails at
once with ``CheckpointDirLockedError``. Restores never take it.

Restoring lives in ``checkpoint/saving/restore.py`` and ``latest.py``, ``var_list``
handling in ``checkpoint/saving/var_list.py``, names in ``checkpoint/management/naming.py``, the directory claims in
``checkpoint/saving/directories.py``, and taking and writing a snapshot in
``checkpoint/saving/save_job.py``.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from trainhooks._clock import Clock, wall_clock
from trainhooks.checkpoint.distributed.group import SINGLE_PROCESS, ProcessGroup
from trainhooks.checkpoint.management.retention import Retention
from trainhooks.checkpoint.management.state_file import update_checkpoint_state
from trainhooks.checkpoint.saving.background import BackgroundWriter
from trainhooks.checkpoint.saving.directories import (
    DirectoryClaims,
    track_background_writer,
    wait_for_saves_into,
)
from trainhooks.checkpoint.saving.latest import (
    restore_latest_checkpoint,
    restore_latest_in_group,
)
from trainhooks.checkpoint.saving.layout import SaveCache
from trainhooks.checkpoint.saving.restore import RestoreReport, restore_checkpoint
from trainhooks.checkpoint.saving.save_job import (
    CommittedSave,
    SaveJob,
    take_snapshot,
    write_and_record,
)
from trainhooks.checkpoint.saving.snapshot import SnapshotPool
from trainhooks.checkpoint.saving.var_list import StateHolder, VarList
from trainhooks.checkpoint.storage import Storage

__all__ = ["CommittedSave", "Saver", "StateHolder"]

logger = logging.getLogger(__name__)


class Saver:
    """Saves and restores a session's state as checkpoints, with TF's naming and retention.

    Args:
      var_list: what to save: None for the whole ``session.state``; a dict of names to
        values to save instead of the session's state; or a list of keys of
        ``session.state`` to save only those entries.
      max_to_keep: how many recent checkpoints to keep; older ones are deleted. None or
        0 keeps every checkpoint (the state file then lists only the newest).
      keep_checkpoint_every_n_hours: additionally keep, for good, one checkpoint per
        this many hours of training.
      pad_step_number: name checkpoints ``<save_path>-%08d`` instead of ``-%d``.
      save_relative_paths: write paths relative to the directory in the state file,
        so the directory can be moved.
      filename: the save path used when ``save`` is given ``save_path=None``.
      allow_empty: with an empty ``var_list``, make ``save`` and ``restore`` no-ops
        instead of raising ``ValueError("No variables to save")``.
      max_shard_bytes: split the tensors across data files of about this size, so
        that large states are written and read in parallel; None: the format's default.
      async_save: save in the background (``docs/internals.md``): :meth:`save` copies the state
        into reused host buffers and returns; writing, commit, state file and retention
        run on a background thread, one save at a time. See :meth:`wait`,
        :meth:`poll_committed` and :meth:`close`.
      background_priority: ``"idle"`` (default) runs a background save's threads at
        the lowest scheduling priority, so the training loop always preempts them
        (they are raised again when :meth:`wait` or the next save waits for them);
        ``"normal"`` lets them compete with training for the CPU.
      storage: the :class:`~trainhooks.checkpoint.storage.base.Storage` that checkpoint
        directories are written through (default: the local disk); the state file and
        retention's deletes always go to the local disk.
      atomic_restore: True (default): :meth:`restore` writes nothing into the state
        until the whole checkpoint verified, so a corrupt one leaves the state as it
        was. False reads each large tensor (at least 4 MiB, in contiguous host memory)
        straight from the file into the state and checksums it there: one pass over
        the data instead of a read and a copy (``docs/format.md``), and the large
        tensors of a checkpoint larger than free memory are read from disk once, not
        twice (tensors on an accelerator, small or non-contiguous ones are checked, then
        copied, as before). A corrupt checkpoint is still found and raises
        ``DataLossError``, but the large tensors read before the restore stopped then
        hold its values (the error says so); :meth:`restore_latest`
        goes on to an older checkpoint, which restores every tensor again. A restore
        with ``strict=False`` is atomic either way: an older checkpoint restored after a
        failure need not hold every tensor the failed one wrote.
      clock: the time source for ``keep_checkpoint_every_n_hours``.
      process_group: the processes that save and restore together
        (:class:`~trainhooks.checkpoint.distributed.torch_group.TorchProcessGroup` in a
        torch.distributed job). Every rank then calls :meth:`save` and
        :meth:`restore_latest` at the same point with the same arguments: every rank
        writes its share of the data files, rank 0 commits them as one checkpoint,
        writes the state file and applies retention; a restore restores on every rank
        the checkpoint that rank 0 chose. Default: this process alone.

    Example:
        >>> import os, tempfile
        >>> import numpy as np, trainhooks as th
        >>> sess = th.Session({"w": np.zeros(3)})
        >>> run_dir = tempfile.mkdtemp()
        >>> saver = th.Saver(max_to_keep=2)
        >>> prefix = saver.save(sess, os.path.join(run_dir, "model.ckpt"), global_step=10)
        >>> os.path.basename(prefix)
        'model.ckpt-10'
        >>> sess.state["w"][:] = 7.0
        >>> saver.restore(sess, th.latest_checkpoint(run_dir))
        >>> sess.state["w"]
        array([0., 0., 0.])
        >>> saver.close()
    """

    def __init__(
        self,
        var_list: Mapping[str, Any] | Sequence[str] | None = None,
        max_to_keep: int | None = 5,
        keep_checkpoint_every_n_hours: float = 10000.0,
        pad_step_number: bool = False,
        save_relative_paths: bool = False,
        filename: str | None = None,
        *,
        allow_empty: bool = False,
        max_shard_bytes: int | None = None,
        async_save: bool = False,
        background_priority: Literal["idle", "normal"] = "idle",
        storage: Storage | None = None,
        clock: Clock = wall_clock,
        process_group: ProcessGroup | None = None,
        atomic_restore: bool = True,
    ) -> None:
        from trainhooks import _checks

        _checks.integer("max_to_keep", max_to_keep, example=5)
        _checks.non_negative_number(
            "keep_checkpoint_every_n_hours",
            keep_checkpoint_every_n_hours,
            allow_none=False,
            unit="hours",
            example=10000.0,
        )
        _checks.boolean("pad_step_number", pad_step_number)
        _checks.boolean("save_relative_paths", save_relative_paths)
        filename = _checks.path("filename", filename)
        _checks.boolean("allow_empty", allow_empty)
        _checks.integer("max_shard_bytes", max_shard_bytes, example=2**30)
        _checks.boolean("async_save", async_save)
        _checks.boolean("atomic_restore", atomic_restore)
        _checks.function("clock", clock, example="time.time")
        self._var_list = VarList(var_list)
        if self._var_list.is_empty and not allow_empty:
            raise ValueError("No variables to save")
        if max_shard_bytes is not None and max_shard_bytes <= 0:
            raise ValueError(
                f"max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}; "
                "pass None for a single data file."
            )
        self._retention = Retention(max_to_keep, keep_checkpoint_every_n_hours, clock=clock)
        self._pad_step_number = bool(pad_step_number)
        self._save_relative_paths = bool(save_relative_paths)
        self._filename = filename
        self._max_shard_bytes = max_shard_bytes
        self._async_save = bool(async_save)
        self._atomic_restore = bool(atomic_restore)
        self._storage = storage
        self._clock = clock
        self._pool = SnapshotPool()
        self._cache = SaveCache()  # the last save's structure, for the next one (layout.py)
        if background_priority not in ("idle", "normal"):
            raise ValueError(
                f"background_priority must be 'idle' or 'normal', got {background_priority!r}."
            )
        self._writer: BackgroundWriter[CommittedSave] = BackgroundWriter(
            idle_priority=background_priority == "idle"
        )
        self._directories = DirectoryClaims()
        self._saved_once = False
        self._set_process_group(SINGLE_PROCESS if process_group is None else process_group)
        if self._async_save:
            track_background_writer(self._writer)

    def _set_process_group(self, group: ProcessGroup) -> None:
        self._group = group
        # Names the checkpoint and flattens the state: the part of a save on this thread.
        self._snapshot = functools.partial(
            take_snapshot,
            var_list=self._var_list,
            filename=self._filename,
            pad_step_number=self._pad_step_number,
            # In a job, only the coordinator claims the directory and keeps its books.
            directories=self._directories if group.rank == 0 else None,
            memo=self._cache.flatten,
        )

    @property
    def process_group(self) -> ProcessGroup:
        """The processes that save and restore together (``SINGLE_PROCESS`` by default)."""
        return self._group

    def join_job(self, group: ProcessGroup) -> None:
        """Save and restore with ``group`` from now on: what a monitored session in a
        torch.distributed job does to a saver built without ``process_group``.

        Args:
          group: the job's checkpoint group.

        Raises:
          ValueError: the saver already saved as a process of its own, or belongs to
            another group of more than one process.
        """
        if self._group is group:
            return
        if self._group.world_size > 1:
            raise ValueError(
                f"This Saver already saves with {self._group!r}; a monitored session of a "
                "torch.distributed job gives its savers the job's group. Build the Saver "
                "without process_group=, or pass the session that group."
            )
        if self._saved_once:
            raise ValueError(
                "This Saver already saved as a single process; build a new Saver for the "
                "torch.distributed job (every rank must take part in every save)."
            )
        self._set_process_group(group)

    @property
    def max_to_keep(self) -> int | None:
        """How many recent checkpoints are kept (None or 0: all)."""
        return self._retention.max_to_keep

    @property
    def keep_checkpoint_every_n_hours(self) -> float:
        """One checkpoint per this many hours is kept for good."""
        return self._retention.keep_checkpoint_every_n_hours

    @property
    def async_save(self) -> bool:
        """Whether :meth:`save` writes in the background."""
        return self._async_save

    @property
    def last_checkpoints(self) -> list[str]:
        """The prefixes of the checkpoints retention still tracks, oldest first.

        With ``async_save`` a checkpoint joins the list when it commits.
        """
        return self._retention.last_checkpoints

    def set_last_checkpoints(self, last_checkpoints: Sequence[str]) -> None:
        """Deprecated in TF: like :meth:`set_last_checkpoints_with_time`, times of +inf.

        Args:
          last_checkpoints: prefixes, oldest first.
        """
        self._writer.wait(raise_error=False)
        self._retention.set_last_checkpoints_with_time(
            [(os.fspath(p), float("inf")) for p in last_checkpoints]
        )

    def set_last_checkpoints_with_time(
        self, last_checkpoints_with_time: Sequence[tuple[str, float]]
    ) -> None:
        """Replace the retention bookkeeping (after the save in flight, if any, commits).

        Args:
          last_checkpoints_with_time: ``(prefix, seconds since the epoch)`` pairs, oldest first.

        Example:
            >>> saver = Saver()
            >>> saver.set_last_checkpoints_with_time([("/tmp/run/m-1", 1.0e9)])
            >>> saver.last_checkpoints
            ['/tmp/run/m-1']
        """
        self._writer.wait(raise_error=False)
        self._retention.set_last_checkpoints_with_time(last_checkpoints_with_time)

    def recover_last_checkpoints(self, checkpoint_paths: Sequence[str]) -> None:
        """Rebuild the retention bookkeeping after a restart, from checkpoints on disk.

        Each checkpoint's time is its file time; checkpoints that no longer exist are
        left out.

        Args:
          checkpoint_paths: prefixes, oldest first (``CheckpointState.all_model_checkpoint_paths``).

        Example:
            >>> ckpt = get_checkpoint_state("/tmp/run")  # doctest: +SKIP
            >>> saver.recover_last_checkpoints(ckpt.all_model_checkpoint_paths)  # doctest: +SKIP
        """
        self._writer.wait(raise_error=False)
        self._retention.recover(checkpoint_paths)

    # ---- save -----------------------------------------------------------------------

    def save(
        self,
        session: StateHolder,
        save_path: str | os.PathLike[str] | None,
        global_step: int | None = None,
        latest_filename: str | None = None,
        write_state: bool = True,
    ) -> str | None:
        """Save the session's state and global step as a checkpoint.

        Args:
          session: the session (or any :class:`StateHolder`) to save.
          save_path: the checkpoint prefix without the step, e.g. ``"ckpt/model.ckpt"``;
            its directory must exist.
          global_step: appended to the name (``ckpt/model.ckpt-200``). The checkpoint
            always records ``session.global_step``.
          latest_filename: the state file's name in the directory (default ``"checkpoint"``).
          write_state: record the checkpoint in the state file and apply retention.

        With ``async_save`` this first waits for the save in flight (raising its error
        if it failed), copies the state into the snapshot buffers, starts the write in
        the background and returns; the checkpoint is committed later (see :meth:`wait`
        and :meth:`poll_committed`). The state may be modified as soon as it returns.

        Returns:
          The checkpoint prefix, to pass to :meth:`restore`; None for an empty saver.

        Raises:
          ValueError: ``latest_filename`` has a directory part, the save path without a
            step is the state file, or the parent directory does not exist.
          Exception: with ``async_save``, the error of the previous background save.

        Example:
            >>> saver.save(sess, "/tmp/run/model.ckpt", global_step=200)  # doctest: +SKIP
            '/tmp/run/model.ckpt-200'
        """
        from trainhooks import _checks

        save_path = _checks.path("save_path", save_path)
        self._saved_once = True
        if not self._async_save:
            pending = self._snapshot(
                session, save_path, global_step, latest_filename, write_state, pool=None
            )
            if pending is None:
                return None
            self._write_and_record(pending)
            return pending.prefix
        self._writer.wait()  # one save in flight at most; its buffers are reused below
        pending = self._snapshot(
            session, save_path, global_step, latest_filename, write_state, pool=self._pool
        )
        if pending is None:
            return None
        self._writer.submit(pending.prefix, lambda: self._write_snapshot(pending))
        return pending.prefix

    @property
    def pending(self) -> str | None:
        """The prefix of the background save in flight (not yet committed), or None."""
        return self._writer.in_flight

    def wait(self) -> None:
        """Block until the background save in flight, if any, has committed.

        Raises:
          Exception: the error of a background save that failed (raised once).

        Example:
            >>> import os, tempfile
            >>> import numpy as np
            >>> from trainhooks import Session
            >>> sess = Session({"w": np.zeros(3)})
            >>> saver = Saver(async_save=True)
            >>> path = os.path.join(tempfile.mkdtemp(), "model.ckpt")
            >>> prefix = saver.save(sess, path, global_step=1)  # returns once the state is copied
            >>> saver.wait()  # the checkpoint is now committed and listed
            >>> saver.last_checkpoints == [prefix]
            True
            >>> saver.close()
        """
        self._writer.wait()

    def poll_committed(self) -> list[CommittedSave]:
        """The background saves committed since the last call, oldest first; never blocks.

        A :class:`CheckpointSaverHook` calls this at every step boundary and runs its
        listeners' ``after_save`` for each. Always empty without ``async_save``.

        Returns:
          A :class:`CommittedSave` (prefix, global step) per committed save.

        Raises:
          Exception: a background save failed; raised once, after the saves committed
            before it have been returned.

        Example:
            >>> for done in saver.poll_committed():  # doctest: +SKIP
            ...     print("committed", done.prefix, "at step", done.global_step)
        """
        return self._writer.poll()

    def close(self) -> None:
        """Wait for the save in flight, then release the snapshot buffers and writer locks.

        The saver stays usable: the next save allocates its buffers and takes the
        directory's writer lock again. ``CheckpointSaverHook.end`` calls it.

        Raises:
          Exception: the error of a background save that failed.

        Example:
            >>> saver = Saver()
            >>> saver.close()
        """
        try:
            self._writer.close()
        finally:
            self._pool.clear()
            self._cache.clear()
            self._directories.release_all()

    def _write_snapshot(self, job: SaveJob) -> CommittedSave:
        """The background half of an ``async_save``: once the snapshot's device copies
        have landed in the pool's buffers, write and record it."""
        self._pool.synchronize()
        return self._write_and_record(job)

    def _write_and_record(self, job: SaveJob) -> CommittedSave:
        return write_and_record(
            job,
            self._retention,
            storage=self._storage,
            max_shard_bytes=self._max_shard_bytes,
            save_relative_paths=self._save_relative_paths,
            group=self._group,
            cache=self._cache,
        )

    # ---- restore --------------------------------------------------------------------

    def restore(
        self, session: StateHolder, save_path: str | os.PathLike[str], *, strict: bool = True
    ) -> RestoreReport | None:
        """Restore the checkpoint at ``save_path`` into the session.

        The whole checkpoint is verified before anything is written into the user's
        objects (unless the saver was built with ``atomic_restore=False``); then the
        state is restored in place and ``session.global_step`` is set.
        A background save into the same directory from this process is waited for
        first (its error, if any, is left for :meth:`wait` or :meth:`poll_committed`).

        Args:
          session: the session (or any :class:`StateHolder`) to restore into.
          save_path: a checkpoint prefix, as returned by :meth:`save` or ``latest_checkpoint``.
          strict: refuse a checkpoint whose entries differ from the state's (missing or
            unexpected names); False restores what matches, skips the rest, and logs
            both per top-level entry (INFO restored, WARNING skipped and why).

        Returns:
          None, as TensorFlow's; with ``strict=False``, a ``RestoreReport`` of the state's
          top-level entries restored in full, in part and not at all, the checkpoint's
          entries left unused, and every place skipped and why.

        Raises:
          ValueError: there is no checkpoint at ``save_path``, or it is a TensorFlow one.
          DataLossError: the checkpoint failed verification; nothing was changed (with
            ``atomic_restore=False``: nothing but the large tensors read before the
            restore stopped).
          StateMismatchError: the checkpoint does not fit the state; nothing was changed.
            With ``strict=False`` only for an object (a module, an optimizer, anything
            with ``state_dict()``) that the checkpoint holds but none of whose saved
            state fits it, e.g. an EMA model's keys restored into a plain model.

        Example:
            >>> saver.restore(sess, th.latest_checkpoint("/tmp/run"))  # doctest: +SKIP
            >>> report = saver.restore(sess, prefix, strict=False)  # doctest: +SKIP
            >>> report.not_restored, report.unused  # doctest: +SKIP
            (['ema'], ['old_head'])
        """
        from trainhooks import _checks

        if save_path is not None:
            save_path = _checks.path("save_path", save_path, allow_none=False)
        if self._var_list.is_empty:
            return None if strict else RestoreReport([], [], [], [], [])
        if save_path is None:
            raise ValueError("Can't load save_path when it is None.")
        prefix = os.fspath(save_path)
        wait_for_saves_into(os.path.dirname(prefix))  # one may be writing this very checkpoint
        report = restore_checkpoint(
            session, prefix, self._var_list, strict=strict, atomic=self._atomic_restore
        )
        return None if strict else report

    def restore_latest(
        self,
        session: StateHolder,
        checkpoint_dir: str | os.PathLike[str],
        latest_filename: str | None = None,
        *,
        repair_state_file: bool = False,
        strict: bool = True,
    ) -> str | None:
        """Restore the newest checkpoint listed in ``checkpoint_dir`` that verifies.

        Checkpoints that are missing or fail verification are skipped, newest first,
        with a WARNING naming each and why. Retention bookkeeping is then recovered
        from the state file, so ``max_to_keep`` keeps working across restarts. A
        background save into the directory from this process commits first, so the
        newest checkpoint is the one this process saved last.

        Args:
          session: the session (or any :class:`StateHolder`) to restore into.
          checkpoint_dir: the directory holding the state file.
          latest_filename: the state file's name (default ``"checkpoint"``).
          repair_state_file: when the state file was missing or unreadable and the
            checkpoint was found by listing the directory, write a new state file (the
            process that saves into the directory should; readers should not).
          strict: as for :meth:`restore`: False restores the entries that match.

        Returns:
          The prefix restored, or None when the directory holds no checkpoint.

        Raises:
          ValueError: the state file lists only checkpoints that do not exist.
          DataLossError: none of the listed checkpoints verifies.

        Example:
            >>> saver.restore_latest(sess, "/tmp/run")  # doctest: +SKIP
            '/tmp/run/model.ckpt-200'
        """
        from trainhooks import _checks

        checkpoint_dir = _checks.path("checkpoint_dir", checkpoint_dir, allow_none=False)
        wait_for_saves_into(os.fspath(checkpoint_dir))

        restore = functools.partial(self.restore, session, strict=strict)
        if self._group.world_size > 1:
            restored = restore_latest_in_group(
                self._group, restore, checkpoint_dir, latest_filename
            )
        else:
            restored = restore_latest_checkpoint(restore, checkpoint_dir, latest_filename)
        if restored is None:
            return None
        if self._group.rank != 0:
            return restored.prefix  # rank 0 keeps the books and the state file
        self.recover_last_checkpoints(restored.listed)
        if repair_state_file and not restored.from_state_file:
            try:
                update_checkpoint_state(
                    checkpoint_dir,
                    restored.prefix,
                    self.last_checkpoints or [restored.prefix],
                    latest_filename,
                    save_relative_paths=self._save_relative_paths,
                )
            except OSError as e:  # a read-only directory: the next save writes it
                logger.warning("Could not write a new checkpoint state file: %s", e)
                return restored.prefix
            logger.warning(
                "Wrote a new checkpoint state file in %s listing %d checkpoints, the newest %s.",
                checkpoint_dir,
                len(self.last_checkpoints or [restored.prefix]),
                restored.prefix,
            )
        return restored.prefix

    def __repr__(self) -> str:
        return (
            f"Saver(max_to_keep={self.max_to_keep}, keep_checkpoint_every_n_hours="
            f"{self.keep_checkpoint_every_n_hours}, async_save={self._async_save}, "
            f"last_checkpoints={self.last_checkpoints})"
        )
