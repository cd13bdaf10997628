"""``UploadListener``: save to the local disk, upload each committed checkpoint in the background."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import NamedTuple

from trainhooks.checkpoint.format.manifest_decode import is_plain_basename
from trainhooks.checkpoint.management.state_file import (
    get_checkpoint_state,
    update_checkpoint_state,
)
from trainhooks.checkpoint.storage import storage_for
from trainhooks.checkpoint.storage.base import Lease
from trainhooks.checkpoint.storage.commit import delete_checkpoint, remove_leftovers
from trainhooks.checkpoint.storage.resolve import is_url
from trainhooks.hooks.listeners.hook_bound import HookBoundListener
from trainhooks.hooks.listeners.remote_copy import (
    HOLDING_DIR,
    copy_checkpoint,
    hold_checkpoint,
    release_hold,
)
from trainhooks.session.session import Session

__all__ = ["UploadListener"]

logger = logging.getLogger(__name__)


class _Upload(NamedTuple):
    """One checkpoint to upload: its name, and where its files are read from."""

    name: str
    step: int
    source: str  # the holding directory, or the checkpoint itself
    held: bool  # ``source`` is a holding directory, removed after the upload


class UploadListener(HookBoundListener):
    """Uploads every committed checkpoint to ``target`` (e.g. ``s3://bucket/run``) in the background.

    The :class:`~trainhooks.CheckpointSaverHook` saves to its local ``checkpoint_dir``
    as usual; in ``after_save`` this listener hard-links the checkpoint just committed
    into ``checkpoint_dir/.trainhooks-upload/`` (so the Saver's ``max_to_keep`` may
    delete it meanwhile) and hands it to one upload thread; the training thread never
    waits for the store. The thread copies the data files, then commits the copy the
    way a save into ``target`` commits (on an object store: the manifest last, with a
    conditional put), then lists it in ``target``'s own state file, then deletes the
    uploaded checkpoints beyond the newest ``keep`` (only ones this state file lists).
    ``latest_checkpoint(target)`` and a session with ``checkpoint_dir=target`` restore
    from the copy as from the local directory.

    When uploads are slower than saves, only the newest checkpoint waiting is uploaded
    next; the older one is skipped. A failed upload is logged and nothing of it is
    listed or committed; the next checkpoint's upload tries again (with the newer
    checkpoint). Training never stops for an upload. Before its first upload the thread
    takes ``target``'s writer lease and removes what a crashed upload left there.

    ``end()`` (after the hook's final save) waits up to ``end_timeout`` seconds for the
    last checkpoint to be uploaded, trying it once more if its upload had failed, then
    gives the lease back; past the timeout it logs an error and returns.

    Args:
      target: where the copies go: ``s3://bucket/prefix``, or any directory.
      keep: how many uploaded checkpoints to keep in ``target``; None keeps all.
      end_timeout: the longest ``end()`` waits for the last upload, in seconds.

    Example:
        >>> import trainhooks as th
        >>> hook = th.CheckpointSaverHook(
        ...     "/tmp/ckpt", save_steps=100, saver=th.Saver(max_to_keep=2),
        ...     listeners=[th.UploadListener("s3://bucket/run", keep=5)])
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        keep: int | None = 5,
        end_timeout: float = 600.0,
    ) -> None:
        from trainhooks import _checks

        target = _checks.directory_path(
            "target", target, allow_none=False, example="'s3://bucket/run'"
        )
        self.keep = _checks.positive_int("keep", keep, example=5)
        self.end_timeout = float(
            _checks.positive_number("end_timeout", end_timeout, allow_none=False, unit="s")
        )
        target = os.fspath(target)
        self.target = target if is_url(target) else os.path.abspath(target)
        self._cond = threading.Condition()
        self._waiting: _Upload | None = None  # the next upload, not started
        self._running: _Upload | None = None
        self._failed: _Upload | None = None  # the newest upload, if it failed
        self._closing = False
        self._thread: threading.Thread | None = None
        self._lease: Lease | None = None

    # -- the training thread ---------------------------------------------------------

    def begin(self) -> None:
        """Start the upload thread; remove links a crashed process left in ``checkpoint_dir``."""
        shutil.rmtree(os.path.join(self._hook().checkpoint_dir, HOLDING_DIR), ignore_errors=True)
        with self._cond:
            self._closing = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._work, name="trainhooks-upload", daemon=True
                )
                self._thread.start()

    def after_save(self, session: Session, global_step_value: int) -> None:
        """Hand the checkpoint just committed to the upload thread; returns at once."""
        source = self._committed_checkpoint(global_step_value)
        held = hold_checkpoint(source)
        upload = _Upload(os.path.basename(source), global_step_value, held or source, bool(held))
        with self._cond:
            for older in (self._waiting, self._failed):
                if older is not None:
                    logger.info("Not uploading %s: %s is newer.", older.name, upload.name)
                    _release(older)
            self._waiting, self._failed = upload, None
            self._cond.notify_all()

    def wait_for_uploads(self, timeout: float | None = None) -> bool:
        """Wait until no upload is running or waiting; False if ``timeout`` seconds passed first.

        Example:
            >>> UploadListener("/tmp/uploads").wait_for_uploads(timeout=1.0)
            True
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: self._waiting is None and self._running is None, timeout
            )

    def end(self, session: Session, global_step_value: int) -> None:
        """Wait (bounded by ``end_timeout``) for the last upload, retrying it once if it failed."""
        thread = self._thread
        if thread is None:
            return
        deadline = _now() + self.end_timeout
        idle = self.wait_for_uploads(self.end_timeout)
        with self._cond:
            if idle and self._failed is not None:
                logger.info("Uploading %s once more before the end.", self._failed.name)
                self._waiting, self._failed = self._failed, None
                self._cond.notify_all()
        if idle:
            idle = self.wait_for_uploads(max(0.0, deadline - _now()))
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread.join(max(0.0, deadline - _now()))
        if not idle or thread.is_alive():
            logger.error(
                "Uploads to %s did not finish within %.0f s; the newest checkpoint there may "
                "be older than the local one.",
                self.target,
                self.end_timeout,
            )
            return  # the thread still writes under the lease; it lapses with the process
        self._thread = None
        for left in (self._waiting, self._failed):
            if left is not None:
                _release(left)
        self._waiting = self._failed = None
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    # -- the upload thread -----------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._closing)
                if self._waiting is None:
                    return
                upload, self._waiting = self._waiting, None
                self._running = upload
            ok = False
            try:
                self._upload(upload)
                ok = True
            except Exception as e:  # an upload never stops training: log it, try the next
                logger.error(
                    "Uploading %s to %s failed (%s: %s); the next checkpoint's upload tries again.",
                    upload.name,
                    self.target,
                    type(e).__name__,
                    e,
                )
            with self._cond:
                self._running = None
                if ok or self._waiting is not None:
                    _release(upload)
                else:
                    self._failed = upload
                self._cond.notify_all()

    def _claim(self) -> None:
        """Take ``target``'s writer lease and remove a crashed upload's leftovers, once."""
        if self._lease is not None:
            return
        storage = storage_for(self.target)
        storage.makedirs(self.target)
        lease = storage.lease(self.target)
        try:
            remove_leftovers(self.target)
        except BaseException:
            lease.release()
            raise
        self._lease = lease

    def _upload(self, upload: _Upload) -> None:
        self._claim()
        prefix = os.path.join(self.target, upload.name)
        logger.info("Uploading checkpoint for %d to %s.", upload.step, prefix)
        copy_checkpoint(upload.source, prefix)
        state = get_checkpoint_state(self.target)
        listed = [] if state is None else _names(state.all_model_checkpoint_paths)
        names = [n for n in listed if n != upload.name] + [upload.name]
        doomed = names[: -self.keep] if self.keep else []
        names = names[len(doomed) :]
        update_checkpoint_state(
            self.target,
            prefix,
            all_model_checkpoint_paths=[os.path.join(self.target, n) for n in names],
        )
        for name in doomed:
            try:
                delete_checkpoint(os.path.join(self.target, name))
            except (OSError, ValueError) as e:
                logger.warning("Not deleting the old upload %s: %s", name, e)


def _names(paths: list[str]) -> list[str]:
    # A state file is data: only plain names of checkpoints count, never "..".
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    return [n for n in names if is_plain_basename(n)]


def _release(upload: _Upload) -> None:
    if upload.held:
        release_hold(upload.source)


def _now() -> float:
    return time.monotonic()
