"""``CheckpointSaverHook`` and ``CheckpointSaverListener``: when to checkpoint, and who hears of it.

The hook follows TensorFlow 2.x's ``tf.compat.v1.train.CheckpointSaverHook`` call for
call (``docs/semantics.md``), with one graph-free change, listed among the deliberate
differences there: after every run it reads the real global step from
``run_context.session.global_step``; there is no stale-step pre-check.

One save is split in two halves, :meth:`CheckpointSaverHook._before_save_and_write`
(listeners' ``before_save``, then ``Saver.save``) and
:meth:`CheckpointSaverHook._after_commit` (listeners' ``after_save``). With synchronous
saving the second half runs right after the first. With background saving (``docs/internals.md``,
a saver with ``async_save``) ``Saver.save`` returns once the state is copied, and the
hook delivers the second half on the training thread at the first step boundary (the
start of ``before_run``, the end of ``after_run``) after ``Saver.poll_committed``
reports the commit (``checkpoint_delivery.py``); before the next save and in ``end`` it
waits for it. Listeners therefore see the same calls in the same order as with
synchronous saving, each ``after_save`` for a committed checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal

from trainhooks._clock import Clock, wall_clock
from trainhooks.checkpoint.storage import storage_for
from trainhooks.hooks.checkpoint_delivery import CommitDelivery
from trainhooks.hooks.timers import SecondOrStepTimer
from trainhooks.session.run_hook import SessionRunContext, SessionRunHook, SessionRunValues

if TYPE_CHECKING:
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.session.coordinator import Coordinator
    from trainhooks.session.creators import Scaffold
    from trainhooks.session.job import Job
    from trainhooks.session.session import Session

__all__ = ["CheckpointSaverHook", "CheckpointSaverListener"]

logger = logging.getLogger(__name__)


class CheckpointSaverListener:
    """Interface for listeners that take action before or after a checkpoint save.

    A listener triggers only in steps when its :class:`CheckpointSaverHook` saves, and
    is called at these points:

    * ``begin()``: before using the session (from the hook's ``begin``);
    * ``before_save(session, global_step_value)``: before each ``Saver.save``;
    * ``after_save(session, global_step_value)``: after each save, once the checkpoint
      is committed. A truthy return asks training to stop after the current step
      (only for saves made after a step; the save at session creation and the final
      save in ``end`` cannot stop training);
    * ``end(session, global_step_value)``: once, at the end of the session, after the
      hook's final save (if one was needed), with the final step.

    Saves include the one at session creation (also after a recovery, which re-saves
    the restored step) and the final one. All methods do nothing by default.

    A listener may act on its own, less frequent schedule, based on
    ``global_step_value``. It should then implement ``end()`` to handle the last
    checkpoint, but must not act twice when ``after_save()`` already handled that last
    save: when the final step was just saved by a step, the hook does not save again
    in ``end`` and ``end`` follows an ``after_save`` for the same step. Remember the
    step you handled:

    Example:
        >>> import trainhooks as th
        >>> class ExportEveryN(th.CheckpointSaverListener):
        ...     def __init__(self, every_n_steps):
        ...         self.every_n_steps = every_n_steps
        ...         self.exported = []           # steps handled, in order
        ...     def after_save(self, session, global_step_value):
        ...         if global_step_value % self.every_n_steps == 0:
        ...             self._export(global_step_value)
        ...     def end(self, session, global_step_value):
        ...         if not self.exported or self.exported[-1] != global_step_value:
        ...             self._export(global_step_value)      # the last checkpoint, once
        ...     def _export(self, step):
        ...         self.exported.append(step)
        >>> listener = ExportEveryN(every_n_steps=4)
        >>> for step in (0, 2, 4, 6):          # the hook saving every 2 steps
        ...     listener.after_save(None, step)
        >>> listener.end(None, 6)               # 6 was saved but not handled: act now
        >>> listener.end(None, 6)               # ... and never twice
        >>> listener.exported
        [0, 4, 6]

    To use a listener, pass it to a hook:
    ``CheckpointSaverHook(checkpoint_dir, save_steps=100, listeners=[listener])``.
    """

    def set_hook(self, hook: CheckpointSaverHook) -> None:
        """Called by the hook before ``begin()``; the default keeps it as ``self.hook``.

        Listeners that need the checkpoint directory or the path of the checkpoint
        just written read them from the hook (``hook.checkpoint_dir``,
        ``hook.last_checkpoint_path``).

        Args:
          hook: the :class:`CheckpointSaverHook` this listener was given to.
        """
        self.hook = hook

    def begin(self) -> None:
        """Called once, from the hook's ``begin``, before the session is created."""

    def before_save(self, session: Session, global_step_value: int) -> None:
        """Called before each save, with the step being saved."""

    def after_save(self, session: Session, global_step_value: int) -> bool | None:
        """Called after each save is committed; return True to ask training to stop."""
        return None

    def end(self, session: Session, global_step_value: int) -> None:
        """Called once at the end of the session, after the final save, with the last step."""


class _JobStop:
    """A run context whose ``request_stop`` is a vote of the job (``session/job.py``)."""

    def __init__(self, job: Job) -> None:
        self._job = job

    def request_stop(self) -> None:
        self._job.request_stop()


class _SaveSkipped(Exception):
    """A save failed, was logged (``on_save_error="log"``) and training goes on."""


class CheckpointSaverHook(SessionRunHook):
    """Saves checkpoints every N steps or N seconds, and at session creation and end.

    When it acts (TF 2.x semantics):

    * ``begin``: creates ``checkpoint_dir`` and calls every listener's ``begin``.
    * ``after_create_session``: saves at the current global step (``model.ckpt-0`` for
      a fresh run; the restored step again after a restore or recovery) and restarts
      the timer from that step. A listener's stop request is ignored here.
    * ``after_run``: reads the real global step; if the timer triggers for it, records
      the trigger, then saves. If any listener's ``after_save`` returns a truthy value,
      it requests a stop (every listener is still called).
    * ``end``: saves the final step unless it is the step last saved by the timer, then
      calls every listener's ``end`` with the final step, then closes the saver (which
      releases the directory's writer lock; the saver stays usable). ``end`` runs only
      when the session closes cleanly (including end of input), so an exception in the
      loop leaves no final checkpoint.

    With background saving (``async_save=True``, or a ``saver`` built with
    ``async_save=True``) a save returns once the state is copied, and listeners'
    ``after_save`` runs on the training thread at the first step boundary after the
    checkpoint is committed (the start of the next ``before_run`` or the end of an
    ``after_run``); the next save, and ``end``, first wait for it. A stop requested
    by such an ``after_save`` takes effect after the step during which it is
    delivered. A background save that failed is raised at the step boundary that
    learns of it.

    Args:
      checkpoint_dir: base directory for the checkpoint files.
      save_secs: save every N seconds.
      save_steps: save every N steps (``0``: every new step).
      saver: the :class:`~trainhooks.Saver` used for saving; it keeps its own
        ``async_save`` setting.
      checkpoint_basename: base name for the checkpoints (``model.ckpt`` gives
        ``model.ckpt-<step>``).
      scaffold: a :class:`~trainhooks.Scaffold` whose ``saver`` is used.
      listeners: :class:`CheckpointSaverListener` instances, called in order around
        each save.
      async_save: save in the background (``docs/internals.md``). The hook's own default saver is
        then ``Saver(async_save=True)``; with ``scaffold``, the scaffold's default
        saver is created that way (``Scaffold.use_async_save``). A ``saver`` (or a
        scaffold's saver) that saves synchronously is refused.
      on_save_error: ``"raise"`` (TF's behaviour: a failed save stops training) or
        ``"log"``: log the error at ERROR level, naming the checkpoint and the cause,
        and keep training; the checkpoints already listed stay listed and intact.
        Errors of listeners are always raised.
      clock: the time source for ``save_secs`` (tests pass a fake clock).

    Raises:
      ValueError: if both ``saver`` and ``scaffold`` are given, not exactly one of
        ``save_secs`` and ``save_steps``, ``on_save_error`` is neither ``"raise"`` nor
        ``"log"``, or ``async_save=True`` comes with a synchronous saver.

    Example:
        >>> import trainhooks as th
        >>> hook = th.CheckpointSaverHook("/tmp/ckpt", save_steps=100, async_save=True)
        >>> with th.MonitoredTrainingSession(  # doctest: +SKIP
        ...     state={"model": model}, chief_only_hooks=[hook],
        ... ) as sess:
        ...     while not sess.should_stop():
        ...         sess.run(train_step)
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str],
        save_secs: float | None = None,
        save_steps: int | None = None,
        saver: Saver | None = None,
        checkpoint_basename: str = "model.ckpt",
        scaffold: Scaffold | None = None,
        listeners: Iterable[CheckpointSaverListener] | None = None,
        *,
        async_save: bool = False,
        on_save_error: Literal["raise", "log"] = "raise",
        clock: Clock = wall_clock,
    ) -> None:
        from trainhooks import _checks
        from trainhooks.session.creators import Scaffold as _Scaffold

        checkpoint_dir = _checks.directory_path("checkpoint_dir", checkpoint_dir, allow_none=False)
        _checks.positive_number("save_secs", save_secs, allow_zero=True, unit="seconds")
        _checks.positive_int("save_steps", save_steps, allow_zero=True)
        _checks.has_methods(
            "saver", saver, ("save", "restore"), what="a Saver", example="Saver(max_to_keep=5)"
        )
        _checks.string(
            "checkpoint_basename", checkpoint_basename, allow_empty=False, example="'model.ckpt'"
        )
        _checks.instance_of("scaffold", scaffold, _Scaffold, example="Scaffold(state=state)")
        listeners = _checks.listener_list("listeners", listeners)
        _checks.boolean("async_save", async_save)
        logger.info("Create CheckpointSaverHook.")
        if saver is not None and scaffold is not None:
            raise ValueError("You cannot provide both saver and scaffold.")
        if on_save_error not in ("raise", "log"):
            raise ValueError(f"on_save_error must be 'raise' or 'log', got {on_save_error!r}.")
        self._saver = saver
        self._checkpoint_dir = os.fspath(checkpoint_dir)
        self._save_path = os.path.join(self._checkpoint_dir, checkpoint_basename)
        self._scaffold = scaffold
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps, clock=clock)
        if async_save:
            if saver is not None and not saver.async_save:
                raise ValueError(
                    "CheckpointSaverHook(async_save=True) was given a saver that saves "
                    "synchronously: pass saver=Saver(..., async_save=True), or leave "
                    "async_save=False (the saver's own setting is used)."
                )
            if scaffold is not None:
                scaffold.use_async_save()
        self._async_save = bool(async_save)
        self._on_save_error = on_save_error
        self._listeners: list[CheckpointSaverListener] = list(listeners or [])
        self._last_checkpoint_path: str | None = None
        self._delivery = CommitDelivery()
        self._job: Job | None = None
        self._vote: int | None = None
        for listener in self._listeners:
            set_hook = getattr(listener, "set_hook", None)
            if set_hook is not None:
                set_hook(self)

    @property
    def checkpoint_dir(self) -> str:
        """The directory the checkpoints are written to."""
        return self._checkpoint_dir

    @property
    def save_path(self) -> str:
        """The checkpoint prefix without the step (``<checkpoint_dir>/model.ckpt``)."""
        return self._save_path

    @property
    def listeners(self) -> list[CheckpointSaverListener]:
        """The listeners, in the order they are called."""
        return list(self._listeners)

    @property
    def last_checkpoint_path(self) -> str | None:
        """The prefix of the last committed checkpoint (``.../model.ckpt-200``), or None.

        Set before listeners' ``after_save`` runs, so a listener reads the checkpoint
        it is told about.
        """
        return self._last_checkpoint_path

    @property
    def saver(self) -> Saver:
        """The saver: ``saver=``, else ``scaffold.saver``, else a default ``Saver()``."""
        return self._get_saver()

    def begin(self) -> None:
        """Create the checkpoint directory, then call every listener's ``begin``."""
        # TF's begin opens a summary writer for checkpoint_dir, which creates the
        # directory; Saver.save expects its parent directory to exist.
        storage_for(self._checkpoint_dir).makedirs(self._checkpoint_dir)
        for listener in self._listeners:
            listener.begin()

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        """Save a checkpoint at the session's current step (a listener's stop request is ignored)."""
        global_step = session.global_step
        # A stop requested by a listener here is ignored, as in TF.
        self._save(session, global_step)
        self._timer.update_last_triggered_step(global_step)

    def before_run(self, run_context: SessionRunContext) -> None:
        """Deliver a background save committed since the last step (its ``after_save``)."""
        self._deliver_committed(run_context.session, run_context)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Save when the timer triggers for the real global step; a truthy ``after_save`` requests a stop."""
        global_step = run_context.session.global_step
        if self._vote is not None and self._job is not None:
            due = self._job.take_save(self._vote)  # the job's decision, the same on every rank
        else:
            due = self._timer.should_trigger_for_step(global_step)
        if due:
            # Updated before saving, as TF does: a save that raises is not retried
            # at the same step.
            self._timer.update_last_triggered_step(global_step)
            if self._save(run_context.session, global_step, run_context):
                self._stopper(run_context).request_stop()
        self._deliver_committed(run_context.session, run_context)

    def end(self, session: Session) -> None:
        """Save the last step unless just saved, then call every listener's ``end`` and close the saver."""
        last_step = session.global_step
        if last_step != self._timer.last_triggered_step():
            self._save(session, last_step)
        self._deliver_committed(session, None, wait=True)
        try:
            for listener in self._listeners:
                listener.end(session, last_step)
        finally:
            self._close_saver()

    def _save(
        self, session: Session, step: int, run_context: SessionRunContext | None = None
    ) -> bool:
        """Saves a checkpoint at ``step``; returns True if a listener asked to stop.

        ``run_context`` is given for a save made in ``after_run``, the only one whose
        listeners may stop training. A background save returns False: its
        ``after_save`` comes at a later step boundary (:meth:`_deliver_committed`).
        """
        # The previous save's after_save comes before this save's before_save.
        self._deliver_committed(session, run_context, wait=True)
        try:
            checkpoint_path = self._before_save_and_write(session, step)
        except _SaveSkipped:
            return False
        if checkpoint_path is not None and self._get_saver().async_save:
            self._delivery.start(checkpoint_path, step, can_stop=run_context is not None)
            return False
        return self._after_commit(session, step, checkpoint_path)

    def _before_save_and_write(self, session: Session, step: int) -> str | None:
        """Listeners' ``before_save``, then ``Saver.save``; returns the checkpoint prefix.

        Raises:
          _SaveSkipped: the save failed and ``on_save_error="log"`` logged it.
        """
        logger.info("Calling checkpoint listeners before saving checkpoint %d...", step)
        for listener in self._listeners:
            listener.before_save(session, step)
        logger.info("Saving checkpoints for %d into %s.", step, self._save_path)
        try:
            return self._get_saver().save(session, self._save_path, global_step=step)
        except Exception as e:
            if self._on_save_error == "raise":
                raise
            self._log_failed_save(step, e)
            raise _SaveSkipped from e

    def _after_commit(self, session: Session, step: int, checkpoint_path: str | None) -> bool:
        """Listeners' ``after_save`` for a committed checkpoint; True if one asked to stop."""
        if checkpoint_path is not None:
            self._last_checkpoint_path = checkpoint_path
        logger.info("Calling checkpoint listeners after saving checkpoint %d...", step)
        should_stop = False
        for listener in self._listeners:
            if listener.after_save(session, step):
                logger.info(
                    "A CheckpointSaverListener requested that training be stopped. listener: %s",
                    listener,
                )
                should_stop = True
        return should_stop

    def _deliver_committed(
        self, session: Session, run_context: SessionRunContext | None, *, wait: bool = False
    ) -> None:
        """At a step boundary: ``after_save`` for the background save, once it committed.

        See :meth:`~trainhooks.hooks.checkpoint_delivery.CommitDelivery.deliver`; with
        nothing in flight the saver is not even looked up.
        """
        if self._delivery.in_flight is not None:
            self._delivery.deliver(
                self._get_saver(),
                session,
                None if run_context is None else self._stopper(run_context),
                after_commit=self._after_commit,
                on_failure=None if self._on_save_error == "raise" else self._log_failed_save,
                wait=wait,
            )

    def _log_failed_save(self, step: int, error: Exception) -> None:
        logger.error(
            "Saving checkpoint for step %d into %s failed; training continues because "
            "on_save_error='log', and the checkpoints already listed are kept: %s: %s",
            step,
            self._save_path,
            type(error).__name__,
            error,
        )

    def _close_saver(self) -> None:
        """Release the saver's writer locks and snapshot buffers once training ends."""
        saver = self._saver if self._saver is not None else getattr(self._scaffold, "saver", None)
        if saver is not None:
            saver.close()  # every save of the hook was waited for and delivered already

    def _join_job(self, job: Job) -> None:
        """Save as one process of a torch.distributed job (a monitored session calls it).

        Every rank saves at the same steps and writes its part; the chief alone runs
        the listeners. ``save_steps`` is the same decision on every rank; with
        ``save_secs`` the chief's clock decides and the job agrees on it at its check
        steps (``session/job.py``).
        """
        self._job = job
        if self._saver is not None:
            self._saver.join_job(job.checkpoint_group)
        if not job.is_chief:
            self._listeners = []
        if self._timer.every_secs is not None:
            self._vote = job.add_save_vote(self._chief_wants_save)

    def _stopper(self, run_context: SessionRunContext) -> Any:
        """Where a listener's stop request goes: the step's context, or in a job a vote
        of the chief, so that every rank stops at the next step the job agrees at."""
        return run_context if self._job is None else _JobStop(self._job)

    def _chief_wants_save(self, step: int) -> bool:
        """On the chief, at a check step: should the step after ``step`` be saved?"""
        return self._timer.should_trigger_for_step(step + 1)

    def _use_default_saver(self, scaffold: Scaffold) -> bool:
        """Save with ``scaffold``'s saver if this hook was given no saver and no scaffold.

        TensorFlow's rule (``training_util._get_saver_or_default``): every hook without
        a saver of its own uses the one default saver, whose bookkeeping the session
        recovers when it restores. Returns True if the hook now uses it. A hook whose
        background setting differs from the scaffold's keeps a saver of its own.
        """
        if self._saver is not None or self._scaffold is not None:
            return False
        scaffold_async = scaffold.saver.async_save if scaffold.saver else scaffold._async_save
        if scaffold_async != self._async_save:
            return False
        self._scaffold = scaffold
        return True

    def _get_saver(self) -> Saver:
        if self._saver is not None:
            return self._saver
        if self._scaffold is not None:
            saver: Any = getattr(self._scaffold, "saver", None)
            if saver is None:
                raise RuntimeError(
                    "CheckpointSaverHook(scaffold=...) found no saver in the scaffold: "
                    "finalize the scaffold first, or pass saver= instead of scaffold=."
                )
            return saver
        # Graph-free stand-in for TF's SAVERS collection: one default saver per hook.
        from trainhooks.checkpoint.saver import Saver

        group = self._job.checkpoint_group if self._job is not None else None
        self._saver = Saver(async_save=self._async_save, process_group=group)
        return self._saver
