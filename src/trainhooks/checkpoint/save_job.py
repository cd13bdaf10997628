"""One save after its snapshot: write the checkpoint directory, then record it.

``Saver.save`` takes the snapshot on the training thread and gets a :class:`SaveJob`;
:func:`write_and_record` does the rest, there (a synchronous save) or on the background
writer's thread (``async_save``), one save at a time. Recording replaces the state file
after the new checkpoint is durable and before retention deletes what it dropped, so
the state file never names an incomplete or deleted checkpoint.
"""

from __future__ import annotations

from typing import NamedTuple

from trainhooks.checkpoint import format as checkpoint_format
from trainhooks.checkpoint import tree
from trainhooks.checkpoint.datafile import DEFAULT_MAX_FILE_BYTES
from trainhooks.checkpoint.retention import Retention
from trainhooks.checkpoint.state_file import update_checkpoint_state
from trainhooks.checkpoint.storage import Storage

__all__ = ["CommittedSave", "SaveJob", "write_and_record"]


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


def write_and_record(
    job: SaveJob,
    retention: Retention,
    *,
    storage: Storage | None,
    max_shard_bytes: int | None,
    save_relative_paths: bool,
) -> CommittedSave:
    """Write and commit ``job``'s checkpoint directory, then list it and apply retention.

    With ``job.write_state`` False only the directory is written.

    Args:
      job: the snapshot and where it goes.
      retention: the saver's bookkeeping; the checkpoint joins it.
      storage: where the directory is written (None: the local disk).
      max_shard_bytes: the target data file size (None: the format's default).
      save_relative_paths: write relative paths into the state file.

    Returns:
      The committed save.

    Raises:
      OSError: writing failed; the message names the checkpoint. Nothing new is listed.

    Example:
        >>> write_and_record(job, Retention(), storage=None, max_shard_bytes=None,
        ...                  save_relative_paths=False)  # doctest: +SKIP
        CommittedSave(prefix='/tmp/run/model.ckpt-1', global_step=1)
    """
    checkpoint_format.write_checkpoint(
        job.prefix,
        job.flat,
        global_step=job.global_step,
        storage=storage,
        max_shard_bytes=max_shard_bytes or DEFAULT_MAX_FILE_BYTES,
    )
    if job.write_state:
        retention.record(job.prefix)
        update_checkpoint_state(
            job.save_dir,
            job.prefix,
            retention.last_checkpoints,
            job.latest_filename,
            save_relative_paths=save_relative_paths,
        )
        retention.delete_dropped()
    return CommittedSave(job.prefix, job.global_step)
