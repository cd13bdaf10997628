"""``BackupListener``: mirror every committed checkpoint into a second directory."""

from __future__ import annotations

import logging
import os

from trainhooks.checkpoint.format.manifest_decode import is_plain_basename
from trainhooks.checkpoint.management.state_file import (
    get_checkpoint_state,
    update_checkpoint_state,
)
from trainhooks.checkpoint.storage import storage_for
from trainhooks.checkpoint.storage.commit import delete_checkpoint
from trainhooks.checkpoint.storage.resolve import is_url
from trainhooks.hooks.listeners.durable import clean_leftovers, place_checkpoint
from trainhooks.hooks.listeners.hook_bound import HookBoundListener
from trainhooks.session.session import Session

__all__ = ["BackupListener"]

logger = logging.getLogger(__name__)


class BackupListener(HookBoundListener):
    """Mirrors every committed checkpoint into ``backup_dir``, with its own state file.

    After each save the checkpoint directory is copied into ``backup_dir`` (into a
    temporary directory, every file fsynced, then renamed), then ``backup_dir/checkpoint``
    is updated with :func:`~trainhooks.update_checkpoint_state`, so
    ``latest_checkpoint(backup_dir)`` names the newest backup and a session can restore
    from ``backup_dir`` as from the primary directory. Then, unless ``keep_all``, the
    backups that the primary state file no longer lists are deleted, so the backup
    keeps what the Saver's retention keeps. Only backups this listener listed are
    ever deleted.

    Args:
      backup_dir: the second directory (e.g. on another disk or a mounted bucket).
      keep_all: keep every backup instead of following the primary's retention.

    Example:
        >>> import trainhooks as th
        >>> hook = th.CheckpointSaverHook(
        ...     "/tmp/ckpt", save_steps=100, listeners=[th.BackupListener("/mnt/backup")])
    """

    def __init__(self, backup_dir: str | os.PathLike[str], *, keep_all: bool = False) -> None:
        from trainhooks import _checks

        backup_dir = _checks.directory_path(
            "backup_dir", backup_dir, allow_none=False, example="'/mnt/backup'"
        )
        _checks.boolean("keep_all", keep_all)
        backup_dir = os.fspath(backup_dir)
        self.backup_dir = backup_dir if is_url(backup_dir) else os.path.abspath(backup_dir)
        self.keep_all = keep_all

    def begin(self) -> None:
        """Create the backup directory and remove what an interrupted backup left there."""
        storage_for(self.backup_dir).makedirs(self.backup_dir)
        clean_leftovers(self.backup_dir)

    def after_save(self, session: Session, global_step_value: int) -> None:
        """Copy the checkpoint just committed into the backup directory, then list it there."""
        source = self._committed_checkpoint(global_step_value)
        name = os.path.basename(source)
        previous = self._listed(self.backup_dir)
        place_checkpoint(source, os.path.join(self.backup_dir, name), hard_link=False)
        wanted = previous if self.keep_all else self._listed(os.path.dirname(source))
        names = [n for n in wanted if n != name and self._has_backup(n)] + [name]
        update_checkpoint_state(
            self.backup_dir,
            os.path.join(self.backup_dir, name),
            all_model_checkpoint_paths=[os.path.join(self.backup_dir, n) for n in names],
        )
        for stale in previous:
            if stale not in names:
                _delete_copy(os.path.join(self.backup_dir, stale))
        return None

    def _has_backup(self, name: str) -> bool:
        path = os.path.join(self.backup_dir, name)
        return storage_for(path).is_dir(path)

    @staticmethod
    def _listed(directory: str) -> list[str]:
        state = get_checkpoint_state(directory)
        if state is None:
            return []
        # A state file is data: only plain names of checkpoints count, never "..".
        names = [os.path.basename(os.path.normpath(p)) for p in state.all_model_checkpoint_paths]
        return [n for n in names if is_plain_basename(n)]


def _delete_copy(path: str) -> None:
    """Delete a stale copy; a directory holding anything but a checkpoint's files stays."""
    try:
        delete_checkpoint(path)
    except (OSError, ValueError) as e:
        logger.warning("Not deleting the stale backup %s: %s", path, e)
