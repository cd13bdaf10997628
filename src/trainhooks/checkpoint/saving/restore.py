"""Restoring a checkpoint into a session: verify everything first, then write in place.

:func:`restore_checkpoint` opens one checkpoint, verifies every byte range and checksum,
and only then restores the state (in place, so references the user holds stay valid)
and sets the session's global step; with ``atomic=False`` it reads large tensors
straight into the state and checks them there instead. ``Saver.restore`` is built on
it, and ``latest.py`` (``Saver.restore_latest``) on that; neither takes the directory's
writer lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, ThreadPoolExecutor, wait
from typing import Any

from trainhooks import errors
from trainhooks.checkpoint.format.mapped_checkpoint import MappedCheckpoint
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.management.state_file import checkpoint_exists
from trainhooks.checkpoint.saving.sharded_restore import ShardedRestore
from trainhooks.checkpoint.saving.var_list import StateHolder, VarList
from trainhooks.checkpoint.state import tree
from trainhooks.checkpoint.state.host_copies import HostCopies
from trainhooks.checkpoint.storage.commit import checkpoint_containing, is_checkpoint

__all__ = [
    "WRITTEN_NOTE",
    "ReadIntoStateError",
    "RestoreReport",
    "add_note",
    "restore_checkpoint",
    "wrote_into_state",
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
        still raises ``DataLossError``, but the tensors read before the restore stopped
        (the first failure stops every reading thread before its next read) then
        hold its values (the error, or the note added to any other exception, says
        so). Ignored with ``strict=False``: a checkpoint restored after
        such a failure need not cover every tensor the failed one wrote.

    Returns:
      What was restored and what skipped, per top-level entry of the state.

    Raises:
      ValueError: there is no checkpoint at ``prefix``, or it is a TensorFlow one.
      DataLossError: the checkpoint failed verification; nothing was changed (with
        ``atomic=False``: nothing but the large tensors read before it stopped).
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


class ReadIntoStateError(errors.DataLossError):
    """A one-pass restore failed verification after writing into the state."""


WRITTEN_NOTE = (
    "The restore was reading large tensors straight into the state (atomic_restore=False): "
    "those it read before it stopped (the last ones in part) hold the checkpoint's values; "
    "restore another checkpoint before using the state."
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


def add_note(error: BaseException, text: str) -> None:
    """``error.add_note(text)``: shown under its traceback (Python 3.11+; on 3.10 the note
    is kept in ``__notes__`` all the same, and logged)."""
    note = getattr(error, "add_note", None)
    if note is not None:
        note(text)
        return
    error.__notes__ = [*getattr(error, "__notes__", ()), text]  # type: ignore[attr-defined]
    logger.error("%s: %s", type(error).__name__, text)


def wrote_into_state(error: BaseException) -> bool:
    """Whether ``error`` ended a one-pass restore after it wrote into the state."""
    return isinstance(error, ReadIntoStateError) or any(
        WRITTEN_NOTE in note for note in getattr(error, "__notes__", ())
    )


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
        stop = threading.Event()  # a failure on either side stops both
        rest = pool.submit(
            reader.verify,
            files=sharded.verify_files,
            exclude={run for _, run in large},
            stop=stop,
        )
        try:
            try:
                nbytes = reader.read_runs(large, stop=stop)
            except CancelledError:
                rest.result()  # raises the mismatch that stopped the reads
                raise
            except BaseException:
                stop.set()  # read_runs did, unless interrupted between two runs
                raise
            finally:
                wait([rest])  # no thread of this restore is left running
            rest.result()
        except errors.DataLossError as e:
            if not large:
                raise  # nothing was written
            raise ReadIntoStateError(f"{e}. {WRITTEN_NOTE}") from e
        except BaseException as e:
            if large:
                add_note(e, WRITTEN_NOTE)
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
