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
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, NamedTuple

from trainhooks import errors
from trainhooks.checkpoint.distributed.group import ProcessGroup
from trainhooks.checkpoint.format.mapped_checkpoint import MappedCheckpoint
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.management.state_file import (
    checkpoint_exists,
    find_checkpoints,
    get_checkpoint_state,
    inside_by_name,
)
from trainhooks.checkpoint.saving.sharded_restore import ShardedRestore
from trainhooks.checkpoint.saving.var_list import StateHolder, VarList
from trainhooks.checkpoint.state import tree
from trainhooks.checkpoint.state.host_copies import HostCopies
from trainhooks.checkpoint.storage.commit import checkpoint_containing, is_checkpoint

__all__ = [
    "Candidates",
    "RestoreReport",
    "RestoredLatest",
    "latest_candidates",
    "restore_checkpoint",
    "restore_first",
    "restore_latest_checkpoint",
    "restore_latest_in_group",
]

RestoreReport = tree.RestoreReport

logger = logging.getLogger(__name__)


def restore_checkpoint(
    session: StateHolder,
    prefix: str,
    var_list: VarList,
    *,
    strict: bool = True,
    atomic: bool = True,
) -> RestoreReport:
    """Verify the checkpoint at ``prefix``, then restore it into ``session``.

    Args:
      session: the session (or any ``StateHolder``) to restore into.
      prefix: a checkpoint prefix, as ``Saver.save`` returns it.
      var_list: which part of the state to restore.
      strict: refuse a checkpoint whose entries differ from the state's; False restores
        what matches, skips the rest and logs both, per top-level entry.
      atomic: True (the default) writes nothing until every checksum passed. False
        reads each large tensor (a checksum run of its own, at least 4 MiB, into
        C-contiguous host memory) straight into the state and checksums it there: one
        pass over the data and no second copy. The rest is checked as before; the state
        must still fit the checkpoint before anything is read. A corrupt checkpoint
        still raises ``DataLossError``, but the tensors read before the mismatch was
        found then hold its values (the error, or the note added to any other
        exception, says so). Ignored with ``strict=False``: a checkpoint restored after
        such a failure need not cover every tensor the failed one wrote.

    Returns:
      What was restored and what skipped, per top-level entry of the state.

    Raises:
      ValueError: there is no checkpoint at ``prefix``, or it is a TensorFlow one.
      DataLossError: the checkpoint failed verification; nothing was changed (with
        ``atomic=False``: nothing but the large tensors read before the mismatch).
      StateMismatchError: the checkpoint does not fit the state (with ``strict=False``:
        an object in both matches nothing the checkpoint holds for it); nothing was
        changed.

    Example:
        >>> restore_checkpoint(sess, "/tmp/run/model.ckpt-200", VarList(None))  # doctest: +SKIP
    """
    if not checkpoint_exists(prefix):
        raise ValueError("The passed save_path is not a valid checkpoint: " + prefix)
    if not is_checkpoint(prefix):
        inside = checkpoint_containing(prefix)
        if inside is not None:
            raise ValueError(
                f"The passed save_path {prefix} is a file of the trainhooks checkpoint "
                f"{inside}: pass {inside}."
            )
        raise ValueError(
            f"The passed save_path is a TensorFlow checkpoint, not a trainhooks one: "
            f"{prefix}. trainhooks restores only checkpoint directories it wrote; pass "
            "a prefix returned by Saver.save or latest_checkpoint."
        )
    logger.info("Restoring parameters from %s", prefix)
    # Another checkpoint restored after a failure may lack what a one-pass read wrote.
    atomic = atomic or not strict
    # The collector stays off until the manifest and the plan (~300k containers for 100k
    # tensors, none of them garbage) are freed again: otherwise it walks them all once.
    with paused_gc():
        return _restore(session, prefix, var_list, strict, atomic)


def _restore(
    session: StateHolder, prefix: str, var_list: VarList, strict: bool, atomic: bool
) -> RestoreReport:
    try:
        reader = open_checkpoint(prefix)
    except errors.NotFoundError:  # deleted since the check above
        raise ValueError("The passed save_path is not a valid checkpoint: " + prefix) from None
    with reader, ThreadPoolExecutor(1, thread_name_prefix="trainhooks-verify") as pool:
        state = var_list.state_of(session)
        # DTensors read only their own regions (checksummed as read); the rest is checked here
        sharded = ShardedRestore(reader, state)
        try:
            restore_state = _restore_state if atomic else _restore_state_in_one_pass
            report = restore_state(reader, state, sharded, pool, strict)
        except BaseException:
            sharded.undo()
            raise
        var_list.write_back(session, state)
        session.global_step = reader.global_step
    return report


def _restore_state(
    reader: MappedCheckpoint,
    state: Any,
    sharded: ShardedRestore,
    pool: ThreadPoolExecutor,
    strict: bool,
) -> RestoreReport:
    # Checksums (threads that release the GIL) run while the state is checked against
    # the tree; nothing is written before they pass (restore_state's before_apply).
    verified = pool.submit(reader.verify, files=sharded.verify_files)
    saved_tree = reader.tree
    if not isinstance(saved_tree, Mapping):
        verified.result()
        raise errors.DataLossError(f"Checkpoint {reader.prefix}: the manifest holds no state tree")

    return tree.restore_state_report(
        state,
        saved_tree,
        _tensor_getter(reader, sharded, first=verified.result),
        strict=strict,
        locate=reader.locator(unchecked=True),
        before_apply=verified.result,
    )


class _ReadIntoState(errors.DataLossError):
    """A one-pass restore failed verification after writing into the state."""


_WRITTEN = (
    "The restore was reading large tensors straight into the state (atomic_restore=False): "
    "those read before this happened hold the checkpoint's values; restore another "
    "checkpoint before using the state."
)


def _tensor_getter(
    reader: MappedCheckpoint,
    sharded: ShardedRestore,
    *,
    first: Callable[[], object] | None = None,
    unchecked: bool = False,
) -> Callable[[str], TensorData]:
    """``get_tensor`` for ``tree.restore_state``: a DTensor's own region (``sharded``) or the
    tensor's bytes, after ``first()`` (the checksum pass, so that ``tensor_data`` does not
    checksum on its own); ``unchecked`` for a restore that checks them later itself."""

    def get_tensor(name: str) -> TensorData:
        if first is not None:
            first()
        try:
            piece = sharded.piece(name)
            if piece is not None:
                return piece  # type: ignore[return-value]
            return reader.tensor_data(name, unchecked=unchecked)
        except errors.NotFoundError:
            raise KeyError(name) from None

    return get_tensor


def _note(error: BaseException, text: str) -> None:
    """``error.add_note(text)`` (Python 3.11+: shown under its traceback); logged on 3.10."""
    add_note = getattr(error, "add_note", None)
    if add_note is not None:
        add_note(text)
    else:
        logger.error("%s: %s", type(error).__name__, text)


def _restore_state_in_one_pass(
    reader: MappedCheckpoint,
    state: Any,
    sharded: ShardedRestore,
    pool: ThreadPoolExecutor,
    strict: bool,
) -> RestoreReport:
    # Nothing is read before the state is known to fit. Then the large tensors are read
    # straight into the state and checked there while the rest is checksummed from the
    # mapping; the remaining copies follow once both passed.
    saved_tree = reader.tree
    if not isinstance(saved_tree, Mapping):
        raise errors.DataLossError(f"Checkpoint {reader.prefix}: the manifest holds no state tree")

    def read_large(copies: HostCopies) -> None:
        large = copies.take_large(reader.claim_run)
        rest = pool.submit(
            reader.verify, files=sharded.verify_files, exclude={run for _, run in large}
        )
        try:
            try:
                nbytes = reader.read_runs(large)
            finally:
                wait([rest])  # no thread of this restore is left running
            rest.result()
        except errors.DataLossError as e:
            if not large:
                raise  # nothing was written
            raise _ReadIntoState(f"{e}. {_WRITTEN}") from e
        except BaseException as e:
            if large:
                _note(e, _WRITTEN)
            raise
        logger.debug("Read %d tensors (%d bytes) straight into the state", len(large), nbytes)

    try:
        return tree.restore_state_report(
            state,
            saved_tree,
            _tensor_getter(reader, sharded, unchecked=True),
            strict=strict,
            locate=reader.locator(unchecked=True),
            before_write=read_large,
        )
    except errors.StateMismatchError as mismatch:
        # Nothing was written or checked. As in an atomic restore, a corrupt checkpoint
        # is reported as such (restore_latest then goes on to an older one).
        try:
            reader.verify(files=sharded.verify_files)
        except errors.DataLossError as e:
            raise e from mismatch
        raise


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
            written = written or isinstance(e, _ReadIntoState)
            skipped.append(f"{prefix} (failed verification: {e})")
            continue
        except ValueError as e:
            if checkpoint_exists(prefix):
                if written:
                    _note(e, f"An earlier checkpoint failed verification. {_WRITTEN}")
                raise
            skipped.append(f"{prefix} (missing: {e})")
            continue
        except BaseException as e:
            if written:
                _note(e, f"An earlier checkpoint failed verification. {_WRITTEN}")
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
    raise errors.DataLossError(
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
        except _ReadIntoState as e:
            failure = ["data loss", f"rank {group.rank}: {e}", True]
        except errors.DataLossError as e:
            failure = ["data loss", f"rank {group.rank}: {e}"]
        except ValueError as e:
            failure = ["value", f"rank {group.rank}: {type(e).__name__}: {e}"]
        except Exception as e:
            failure = ["other", f"rank {group.rank}: {type(e).__name__}: {e}"]
        reports = group.gather(failure)
        verdict: Any = None
        if reports is not None:
            failed = [r for r in reports if r is not None]
            # The gravest kind decides what every rank does next.
            for kind in ("other", "value", "data loss"):
                same = [message for k, message, *_ in failed if k == kind]
                if same:
                    written = any(len(f) > 2 for f in failed)  # some rank read into its state
                    verdict = [kind, "; ".join(same), written]
                    break
        verdict = group.broadcast(verdict)
        if verdict is None:
            return
        kind, message, written = verdict
        error: Exception
        if kind == "data loss":  # every rank tries the next candidate
            raise (_ReadIntoState if written else errors.DataLossError)(message)
        if kind == "value":
            error = ValueError(message)
        else:
            error = errors.UnknownError(
                f"Restoring {prefix} failed on some ranks; no rank may train from a state "
                f"the others do not share: {message}"
            )
        if written:
            _note(error, _WRITTEN)
        raise error

    return restore_first(restore_together, checkpoint_dir, Candidates(*offer["candidates"]))
