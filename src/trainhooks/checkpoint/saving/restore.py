"""Restoring a checkpoint into a session: verify everything first, then write in place.

:func:`restore_checkpoint` opens one checkpoint, verifies every byte range and checksum,
and only then restores the state (in place, so references the user holds stay valid)
and sets the session's global step. :func:`restore_latest_checkpoint` walks the state
file's list newest first and restores the first checkpoint that verifies, warning about
every one it skips. ``Saver.restore`` and ``Saver.restore_latest`` are built on them;
neither takes the directory's writer lock.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from trainhooks import errors
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.management.state_file import checkpoint_exists, get_checkpoint_state
from trainhooks.checkpoint.saving.var_list import StateHolder, VarList
from trainhooks.checkpoint.state import tree
from trainhooks.checkpoint.storage.commit import is_checkpoint

__all__ = ["restore_checkpoint", "restore_latest_checkpoint"]

logger = logging.getLogger(__name__)


def restore_checkpoint(
    session: StateHolder, prefix: str, var_list: VarList, *, strict: bool = True
) -> None:
    """Verify the checkpoint at ``prefix``, then restore it into ``session``.

    Args:
      session: the session (or any ``StateHolder``) to restore into.
      prefix: a checkpoint prefix, as ``Saver.save`` returns it.
      var_list: which part of the state to restore.
      strict: refuse a checkpoint whose entries differ from the state's.

    Raises:
      ValueError: there is no checkpoint at ``prefix``, or it is a TensorFlow one.
      DataLossError: the checkpoint failed verification; nothing was changed.
      StateMismatchError: the checkpoint does not fit the state; nothing was changed.

    Example:
        >>> restore_checkpoint(sess, "/tmp/run/model.ckpt-200", VarList(None))  # doctest: +SKIP
    """
    if not checkpoint_exists(prefix):
        raise ValueError("The passed save_path is not a valid checkpoint: " + prefix)
    if not is_checkpoint(prefix):
        raise ValueError(
            f"The passed save_path is a TensorFlow checkpoint, not a trainhooks one: "
            f"{prefix}. trainhooks restores only checkpoint directories it wrote; pass "
            "a prefix returned by Saver.save or latest_checkpoint."
        )
    logger.info("Restoring parameters from %s", prefix)
    # The collector stays off until the manifest and the plan (~300k containers for 100k
    # tensors, none of them garbage) are freed again: otherwise it walks them all once.
    with paused_gc():
        _restore(session, prefix, var_list, strict)


def _restore(session: StateHolder, prefix: str, var_list: VarList, strict: bool) -> None:
    try:
        reader = open_checkpoint(prefix)
    except errors.NotFoundError:  # deleted since the check above
        raise ValueError("The passed save_path is not a valid checkpoint: " + prefix) from None
    with reader, ThreadPoolExecutor(1, thread_name_prefix="trainhooks-verify") as pool:
        # Checksums (threads that release the GIL) run while the state is checked against
        # the tree; nothing is written before they pass (restore_state's before_apply).
        verified = pool.submit(reader.verify)
        saved_tree = reader.tree
        if not isinstance(saved_tree, Mapping):
            verified.result()
            raise errors.DataLossError(f"Checkpoint {prefix}: the manifest holds no state tree")

        def get_tensor(name: str) -> TensorData:
            verified.result()  # tensor_data would checksum on its own otherwise
            try:
                return reader.tensor_data(name)
            except errors.NotFoundError:
                raise KeyError(name) from None

        state = var_list.state_of(session)
        tree.restore_state(
            state,
            saved_tree,
            get_tensor,
            strict=strict,
            locate=reader.locator(unchecked=True),
            before_apply=verified.result,
        )
        var_list.write_back(session, state)
        session.global_step = reader.global_step


def restore_latest_checkpoint(
    restore: Callable[[str], None],
    checkpoint_dir: str | os.PathLike[str],
    latest_filename: str | None = None,
) -> tuple[str, list[str]] | None:
    """Restore the newest checkpoint listed in ``checkpoint_dir`` that verifies.

    Candidates are the state file's latest checkpoint, then the others it lists, newest
    first. One that is missing, fails verification, or lies outside ``checkpoint_dir``
    (the state file names an absolute or ``..`` path, or a symlink leads out) is
    skipped; a WARNING names every skipped one and why.

    Args:
      restore: restores one prefix (``Saver.restore`` bound to the session).
      checkpoint_dir: the directory holding the state file.
      latest_filename: the state file's name (default ``"checkpoint"``).

    Returns:
      ``(prefix restored, every prefix the state file lists)``, or None when there is
      no state file.

    Raises:
      ValueError: the state file lists only checkpoints that do not exist.
      DataLossError: none of the listed checkpoints verifies.

    Example:
        >>> restore_latest_checkpoint(lambda p: saver.restore(sess, p), "/tmp/run")  # doctest: +SKIP
        ('/tmp/run/model.ckpt-200', ['/tmp/run/model.ckpt-100', '/tmp/run/model.ckpt-200'])
    """
    ckpt = get_checkpoint_state(checkpoint_dir, latest_filename)
    if ckpt is None:
        return None
    newest = ckpt.model_checkpoint_path
    candidates = [newest, *(p for p in reversed(ckpt.all_model_checkpoint_paths) if p != newest)]
    skipped: list[str] = []
    missing_only = True
    root = os.path.realpath(checkpoint_dir)
    for prefix in candidates:
        if not _inside(root, prefix):
            # A state file is data, not authority: it must not make us read elsewhere.
            skipped.append(
                f"{prefix} (outside {checkpoint_dir}: a state file may only name checkpoints "
                "in its own directory; pass the path to Saver.restore to restore it)"
            )
            continue
        try:
            restore(prefix)
        except errors.DataLossError as e:
            missing_only = False
            skipped.append(f"{prefix} (failed verification: {e})")
            continue
        except ValueError as e:
            if checkpoint_exists(prefix):
                raise
            skipped.append(f"{prefix} (missing: {e})")
            continue
        if skipped:
            logger.warning(
                "Restored %s instead of the latest checkpoint; skipped: %s",
                prefix,
                "; ".join(skipped),
            )
        return prefix, list(ckpt.all_model_checkpoint_paths)
    if missing_only:
        raise ValueError(
            "The passed save_path is not a valid checkpoint: "
            + newest
            + "; skipped: "
            + "; ".join(skipped)
        )
    raise errors.DataLossError(
        f"No checkpoint listed in {checkpoint_dir} could be restored: " + "; ".join(skipped)
    )


def _inside(root: str, prefix: str) -> bool:
    """True if ``prefix`` resolves (symlinks followed) to a path inside directory ``root``."""
    return os.path.commonpath([root, os.path.realpath(prefix)]) == root
