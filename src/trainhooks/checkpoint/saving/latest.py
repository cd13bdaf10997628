"""Restoring the newest checkpoint of a directory that verifies, alone or as a job.

:func:`restore_latest_checkpoint` walks the state file's list newest first and restores
(``restore.py``) the first checkpoint that verifies, warning about every one it skips;
:func:`restore_latest_in_group` does the same on every rank of a job at once, rank 0
choosing. ``Saver.restore_latest`` is built on them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from trainhooks import errors
from trainhooks.checkpoint.distributed.group import ProcessGroup
from trainhooks.checkpoint.management.state_file import (
    checkpoint_exists,
    find_checkpoints,
    get_checkpoint_state,
    inside_by_name,
)
from trainhooks.checkpoint.saving.restore import (
    WRITTEN_NOTE,
    ReadIntoStateError,
    add_note,
    wrote_into_state,
)

__all__ = [
    "Candidates",
    "RestoredLatest",
    "latest_candidates",
    "restore_first",
    "restore_latest_checkpoint",
    "restore_latest_in_group",
]

logger = logging.getLogger(__name__)


class RestoredLatest(NamedTuple):
    """What :func:`restore_latest_checkpoint` restored, and what the directory holds."""

    prefix: str
    #: the checkpoints to track from now on, oldest first
    listed: list[str]
    #: False when the state file was missing or unreadable and the directory was listed
    from_state_file: bool


def restore_latest_checkpoint(
    restore: Callable[[str], object],
    checkpoint_dir: str | os.PathLike[str],
    latest_filename: str | None = None,
) -> RestoredLatest | None:
    """Restore the newest checkpoint listed in ``checkpoint_dir`` that verifies.

    Candidates are the state file's latest checkpoint, then the others it lists, newest
    first. One that is missing or fails verification is skipped; a WARNING names every
    skipped one and why. A path outside ``checkpoint_dir`` (the state file of a moved or
    copied run names the old place) is read as the checkpoint of the same name inside
    it; nothing outside the directory is ever read. Without a usable state file (lost,
    unreadable) the committed checkpoints found in the directory are the candidates,
    newest step first, with a WARNING.

    Args:
      restore: restores one prefix (``Saver.restore`` bound to the session).
      checkpoint_dir: the directory holding the state file.
      latest_filename: the state file's name (default ``"checkpoint"``).

    Returns:
      What was restored, or None when the directory holds no checkpoint.

    Raises:
      ValueError: the state file lists only checkpoints that do not exist.
      DataLossError: none of the candidates verifies.

    Example:
        >>> restore_latest_checkpoint(lambda p: saver.restore(sess, p), "/tmp/run")  # doctest: +SKIP
        RestoredLatest(prefix='/tmp/run/model.ckpt-200', listed=[...], from_state_file=True)
    """
    candidates = latest_candidates(checkpoint_dir, latest_filename)
    if candidates is None:
        return None
    return restore_first(restore, os.fspath(checkpoint_dir), candidates)


class Candidates(NamedTuple):
    """The checkpoints a latest-checkpoint restore tries, newest first (JSON-able)."""

    names: list[str]
    #: the checkpoints to track once one is restored, oldest first
    listed: list[str]
    #: False when the state file was missing or unreadable and the directory was listed
    from_state_file: bool


def latest_candidates(
    checkpoint_dir: str | os.PathLike[str], latest_filename: str | None = None
) -> Candidates | None:
    """What to try restoring from ``checkpoint_dir``, newest first; None if it holds none.

    The state file's latest checkpoint, then the others it lists; without a usable state
    file, the committed checkpoints found by listing the directory (with a WARNING).
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        ckpt = get_checkpoint_state(checkpoint_dir, latest_filename)
    except ValueError as e:  # a state file that names no checkpoint (an empty file)
        logger.warning("%s; ignoring it.", e)
        ckpt = None
    if ckpt is None:
        found = find_checkpoints(checkpoint_dir)
        if not found:
            return None
        logger.warning(
            "%s has no usable checkpoint state file; restoring the newest of the %d "
            "checkpoints found there that verifies.",
            checkpoint_dir,
            len(found),
        )
        return Candidates(list(reversed(found)), found, False)
    newest = ckpt.model_checkpoint_path
    listed = list(ckpt.all_model_checkpoint_paths)
    return Candidates([newest, *(p for p in reversed(listed) if p != newest)], listed, True)


def restore_first(
    restore: Callable[[str], object], checkpoint_dir: str, candidates: Candidates
) -> RestoredLatest:
    """Restore the first of ``candidates`` that verifies (see
    :func:`restore_latest_checkpoint`); each skipped one is named in a WARNING."""
    newest, listed, from_state_file = (
        candidates.names[0],
        candidates.listed,
        candidates.from_state_file,
    )
    skipped: list[str] = []
    missing_only = True
    written = False  # a one-pass restore wrote into the state before failing
    root = os.path.realpath(checkpoint_dir)
    for named in candidates.names:
        prefix = inside_by_name(named, checkpoint_dir) or named
        if not _inside(root, prefix):
            # A state file is data, not authority: it must not make us read elsewhere.
            skipped.append(
                f"{prefix} (outside {checkpoint_dir}: a state file may only name checkpoints "
                "in its own directory; pass the path to Saver.restore to restore it)"
            )
            continue
        if prefix != named:
            logger.info(
                "Reading %s as %s, the checkpoint of that name in %s.",
                named,
                prefix,
                checkpoint_dir,
            )
        try:
            restore(prefix)
        except errors.DataLossError as e:
            missing_only = False
            written = written or wrote_into_state(e)
            skipped.append(f"{prefix} (failed verification: {e})")
            continue
        except ValueError as e:
            if checkpoint_exists(prefix):
                if written:
                    add_note(e, f"An earlier checkpoint failed verification. {WRITTEN_NOTE}")
                raise
            skipped.append(f"{prefix} (missing: {e})")
            continue
        except BaseException as e:
            if written:
                add_note(e, f"An earlier checkpoint failed verification. {WRITTEN_NOTE}")
            raise
        if skipped:
            logger.warning(
                "Restored %s instead of the latest checkpoint; skipped: %s",
                prefix,
                "; ".join(skipped),
            )
        inside = [inside_by_name(p, checkpoint_dir) for p in listed]
        return RestoredLatest(prefix, [p for p in inside if p is not None], from_state_file)
    if missing_only:
        raise ValueError(
            "The passed save_path is not a valid checkpoint: "
            + newest
            + "; skipped: "
            + "; ".join(skipped)
        )
    raise (ReadIntoStateError if written else errors.DataLossError)(
        f"No checkpoint listed in {checkpoint_dir} could be restored: " + "; ".join(skipped)
    )


def _inside(root: str, prefix: str) -> bool:
    """True if ``prefix`` resolves (symlinks followed) to a path inside directory ``root``."""
    return os.path.commonpath([root, os.path.realpath(prefix)]) == root


def restore_latest_in_group(
    group: ProcessGroup,
    restore: Callable[[str], object],
    checkpoint_dir: str,
    latest_filename: str | None = None,
) -> RestoredLatest | None:
    """The latest-checkpoint restore of a job: every rank calls it at the same point.

    Rank 0 alone reads the state file (or lists the directory) and tells every rank
    which checkpoints to try, newest first; then all ranks restore the same candidate at
    the same time and learn each other's outcome. If the candidate fails verification on
    any rank, every rank moves on to the same older one; any other failure (a rank that
    cannot read the directory) fails the whole job, on every rank, naming the rank and
    the cause: no rank may train from a state the others do not share.

    Returns:
      What was restored (the same on every rank), or None when there is no checkpoint.

    Raises:
      DataLossError: no candidate verified on every rank.
      UnknownError: a rank could not restore for another reason.
    """
    offer: Any = None
    if group.rank == 0:
        try:
            found = latest_candidates(checkpoint_dir, latest_filename)
            offer = {"candidates": None if found is None else list(found)}
        except Exception as e:
            offer = {"error": f"rank 0: {type(e).__name__}: {e}"}
    offer = group.broadcast(offer)
    if "error" in offer:
        raise errors.UnknownError(
            f"Choosing the checkpoint to restore from {checkpoint_dir} failed: {offer['error']}"
        )
    if offer["candidates"] is None:
        return None

    def restore_together(prefix: str) -> None:
        failure: list[Any] | None = None
        try:
            restore(prefix)
        except errors.DataLossError as e:
            failure = ["data loss", f"rank {group.rank}: {e}", wrote_into_state(e)]
        except ValueError as e:
            failure = ["value", f"rank {group.rank}: {type(e).__name__}: {e}", wrote_into_state(e)]
        except Exception as e:
            failure = ["other", f"rank {group.rank}: {type(e).__name__}: {e}", wrote_into_state(e)]
        reports = group.gather(failure)
        verdict: Any = None
        if reports is not None:
            failed = [r for r in reports if r is not None]
            # The gravest kind decides what every rank does next.
            for kind in ("other", "value", "data loss"):
                same = [message for k, message, _ in failed if k == kind]
                if same:
                    written = any(w for _, _, w in failed)  # some rank read into its state
                    verdict = [kind, "; ".join(same), written]
                    break
        verdict = group.broadcast(verdict)
        if verdict is None:
            return
        kind, message, written = verdict
        error: Exception
        if kind == "data loss":  # every rank tries the next candidate
            raise (ReadIntoStateError if written else errors.DataLossError)(message)
        if kind == "value":
            error = ValueError(message)
        else:
            error = errors.UnknownError(
                f"Restoring {prefix} failed on some ranks; no rank may train from a state "
                f"the others do not share: {message}"
            )
        if written:
            add_note(error, WRITTEN_NOTE)
        raise error

    return restore_first(restore_together, checkpoint_dir, Candidates(*offer["candidates"]))
