"""One save as a job: its snapshot, then writing the checkpoint directory and recording it.

``Saver.save`` takes the snapshot on the training thread (:func:`take_snapshot`) and
gets a :class:`SaveJob`; :func:`write_and_record` does the rest, there (a synchronous save) or on the background
writer's thread (``async_save``), one save at a time. Recording replaces the state file
after the new checkpoint is durable and before retention deletes what it dropped, so
the state file never names an incomplete or deleted checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from trainhooks.checkpoint.distributed.group import SINGLE_PROCESS, ProcessGroup
from trainhooks.checkpoint.format.datafile import DEFAULT_MAX_FILE_BYTES
from trainhooks.checkpoint.management.naming import checked_latest_filename, checkpoint_name
from trainhooks.checkpoint.management.retention import Retention
from trainhooks.checkpoint.management.state_file import (
    get_checkpoint_state,
    update_checkpoint_state,
)
from trainhooks.checkpoint.saving.directories import DirectoryClaims
from trainhooks.checkpoint.saving.layout import SaveCache
from trainhooks.checkpoint.saving.snapshot import SnapshotPool
from trainhooks.checkpoint.saving.var_list import StateHolder, VarList
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.state import tree
from trainhooks.checkpoint.storage import Storage, storage_for

__all__ = ["CommittedSave", "SaveJob", "take_snapshot", "write_and_record"]


class SaveJob(NamedTuple):
    """One save between its snapshot (training thread) and its commit."""

    prefix: str
    save_dir: str
    latest_filename: str
    write_state: bool
    global_step: int
    flat: tree.FlatState


class CommittedSave(NamedTuple):
    """A background save that has committed: returned by ``Saver.poll_committed``.

    ``prefix`` is what ``Saver.save`` returned; ``global_step`` the step recorded in
    the checkpoint.
    """

    prefix: str
    global_step: int


def take_snapshot(
    session: StateHolder,
    save_path: str | os.PathLike[str] | None,
    global_step: int | None,
    latest_filename: str | None,
    write_state: bool,
    *,
    var_list: VarList,
    filename: str | None,
    pad_step_number: bool,
    directories: DirectoryClaims | None,
    pool: SnapshotPool | None,
    memo: dict[str, Any] | None = None,
) -> SaveJob | None:
    """Name the checkpoint and flatten the state: the part of a save on the training thread.

    Without ``pool`` the buffers alias the live arrays, so the job must be written before
    training continues. A background save passes its saver's :class:`SnapshotPool`: the
    tensors are copied into it (a snapshot the loop may run on from) and the job is
    written elsewhere, one at a time, after ``pool.synchronize()`` (CUDA tensors' copies
    are queued, not awaited, here). The directory is claimed (writer lock, leftovers
    removed) before the state is read.

    Args:
      session, save_path, global_step, latest_filename, write_state: as ``Saver.save``.
      var_list: what the saver saves.
      filename: the saver's save path for ``save_path=None``.
      pad_step_number: name the checkpoint ``<save_path>-%08d``.
      directories: the saver's directory claims.
      pool: the saver's snapshot buffers, or None to alias the state.
      memo: the saver's ``flatten_state`` memo (``SaveCache.flatten``), or None.

    Returns:
      The job, or None for an empty ``var_list`` (nothing to save).

    Raises:
      ValueError: no save path, a bad ``latest_filename``, or the parent directory of
        ``save_path`` does not exist.

    Example:
        >>> job = take_snapshot(sess, "/tmp/run/model.ckpt", 1, None, True,  # doctest: +SKIP
        ...     var_list=VarList(None), filename=None, pad_step_number=False,
        ...     directories=DirectoryClaims(), pool=None)
        >>> job.prefix  # doctest: +SKIP
        '/tmp/run/model.ckpt-1'
    """
    latest_filename = checked_latest_filename(latest_filename)
    if save_path is None:
        save_path = filename
    if save_path is None:
        raise ValueError(
            "save_path is None and the Saver has no filename: pass the checkpoint "
            "prefix, e.g. 'ckpt/model.ckpt'."
        )
    save_path = os.fspath(save_path)
    prefix = checkpoint_name(
        save_path, global_step, latest_filename, pad_step_number=pad_step_number
    )
    if var_list.is_empty:
        return None
    save_dir = os.path.dirname(save_path)
    if not storage_for(save_dir or os.curdir).is_dir(save_dir or os.curdir):
        raise ValueError(f"Parent directory of {save_path} doesn't exist, can't save.")
    if directories is not None:  # None: a rank of a job that only writes data files
        directories.claim(save_dir or os.curdir)
    state = var_list.state_of(session)
    # A pool's device copies may still be in flight: the writer waits for them
    # (SnapshotPool.synchronize) before it reads the buffers.
    flat = tree.flatten_state(state, memo=memo) if pool is None else pool.take(state, wait=False)
    return SaveJob(prefix, save_dir, latest_filename, write_state, int(session.global_step), flat)


def write_and_record(
    job: SaveJob,
    retention: Retention,
    *,
    storage: Storage | None,
    max_shard_bytes: int | None,
    save_relative_paths: bool,
    group: ProcessGroup = SINGLE_PROCESS,
    cache: SaveCache | None = None,
) -> CommittedSave:
    """Write and commit ``job``'s checkpoint directory, then list it and apply retention.

    With ``job.write_state`` False only the directory is written.

    Args:
      job: the snapshot and where it goes.
      retention: the saver's bookkeeping; the checkpoint joins it.
      storage: where the directory is written (None: the local disk).
      max_shard_bytes: the target data file size (None: the format's default).
      save_relative_paths: write relative paths into the state file.
      group: the processes that write this checkpoint together; only its coordinator
        (rank 0) lists it in the state file and applies retention.
      cache: the saver's memory of its last save's structure (``layout.py``), or None.

    Returns:
      The committed save.

    Raises:
      OSError: writing failed; the message names the checkpoint. Nothing new is listed.

    Example:
        >>> write_and_record(job, Retention(), storage=None, max_shard_bytes=None,
        ...                  save_relative_paths=False)  # doctest: +SKIP
        CommittedSave(prefix='/tmp/run/model.ckpt-1', global_step=1)
    """
    write_checkpoint(
        job.prefix,
        job.flat,
        global_step=job.global_step,
        storage=storage,
        max_shard_bytes=max_shard_bytes or DEFAULT_MAX_FILE_BYTES,
        group=group,
        cache=cache,
    )
    if job.write_state and group.rank == 0:
        try:
            state = get_checkpoint_state(job.save_dir or os.curdir, job.latest_filename)
        except ValueError:  # a state file naming no checkpoint: replaced below
            state = None
        if state is not None:
            retention.reconcile(state.all_model_checkpoint_paths, job.save_dir)
            retention.resume_keep_clock(state.last_preserved_timestamp)
        retention.record(job.prefix)
        update_checkpoint_state(
            job.save_dir,
            job.prefix,
            retention.last_checkpoints,
            job.latest_filename,
            # Written only when it matters, so that default state files stay TF's bytes.
            last_preserved_timestamp=(
                retention.last_preserved if retention.keeps_periodically else None
            ),
            save_relative_paths=save_relative_paths,
        )
        retention.delete_dropped()
    return CommittedSave(job.prefix, job.global_step)
