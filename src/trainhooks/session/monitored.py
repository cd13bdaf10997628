"""Monitored sessions: ``MonitoredSession`` and ``SingularMonitoredSession`` (TF's
``monitored_session.py``); the ``MonitoredTrainingSession`` factory lives in
:mod:`trainhooks.training`, the layer above sessions, hooks and checkpoints.

Lifecycle: every hook's ``begin()`` once; the session creator makes the raw session
(restore or initialize); a new ``Coordinator``; every hook's
``after_create_session(session, coord)``; then each ``run()`` is one hooked training
step. ``OutOfRangeError`` and ``StopIteration`` end training cleanly (hooks' ``end``
runs on close); any other error propagates, and ``end`` is not called. In a
``MonitoredSession`` a preemption error (``AbortedError``, ``UnavailableError``, a lost
``torch.distributed`` peer) closes the session, re-creates it from the latest
checkpoint, calls ``after_create_session`` again and retries the same ``run``.

With a :class:`~trainhooks.session.preemption.PreemptionWatcher` (``preemption=``), a
termination signal stops training at the next step boundary: ``should_stop()`` turns
True and the next ``run`` raises ``PreemptedError``, a clean stop, so closing the
session runs the hooks' ``end`` (and the final checkpoint). The watcher's handlers are
installed for the session's lifetime and the previous ones restored on close.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from trainhooks import errors
from trainhooks.session.creators import ChiefSessionCreator, Scaffold, SessionCreator
from trainhooks.session.job import Job, form_job, in_job, is_peer_loss
from trainhooks.session.preemption import PreemptionWatcher
from trainhooks.session.run_hook import SessionRunHook
from trainhooks.session.session import Session
from trainhooks.session.wrappers import (
    CoordinatedSessionCreator,
    RecoverableSession,
    RunFn,
)

__all__ = [
    "MonitoredSession",
    "SingularMonitoredSession",
    "StepContext",
]


class StepContext:
    """What ``run_step_fn`` passes to the step function.

    Args:
      session: the raw session (its ``run`` calls no hooks).
      run_with_hooks_fn: a full hooked ``run`` of the monitored session.

    Example:
        >>> def step_fn(step_context):
        ...     loss = step_context.run_with_hooks(train_step)
        ...     if loss < 0.01:
        ...         step_context.request_stop()
        ...     return loss
    """

    __slots__ = ("_run_with_hooks_fn", "_session")

    def __init__(self, session: Session, run_with_hooks_fn: RunFn) -> None:
        self._session = session
        self._run_with_hooks_fn = run_with_hooks_fn

    @property
    def session(self) -> Session:
        """The raw session."""
        return self._session

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any:
        """One hooked ``run``, with the same arguments as ``MonitoredSession.run``."""
        return self._run_with_hooks_fn(*args, **kwargs)

    def request_stop(self) -> None:
        """Stop training: raises ``StopIteration``, so the step function's return value is lost."""
        raise StopIteration("step_fn has requested the iterations to stop.")


def _fn_args(fn: Any) -> tuple[str, ...]:
    """The positional parameter names of ``fn`` the way TF's ``fn_args`` lists them."""
    if isinstance(fn, functools.partial):
        args = _fn_args(fn.func)
        return tuple(a for a in args[len(fn.args) :] if a not in (fn.keywords or {}))
    if not (inspect.isfunction(fn) or inspect.ismethod(fn)):
        fn = fn.__call__  # a callable object
    names = list(inspect.getfullargspec(fn).args)
    if inspect.ismethod(fn) and names:
        names.pop(0)  # a bound method's self or cls
    return tuple(names)


logger = logging.getLogger(__name__)

#: ``_job=`` default: form the job from the session creator when in one.
_FORM: Any = object()
#: How long ranks wait for each other at start-up when the creator does not say.
DEFAULT_MAX_WAIT_SECS = 30 * 60


def _form_job_for(creator: SessionCreator) -> Job | None:
    """The job of a session built from ``creator`` alone: rank 0 is the chief."""
    if not in_job():
        return None
    scaffold = getattr(creator, "scaffold", None)
    state = scaffold.state if scaffold is not None else None
    return form_job(
        is_chief=None,
        max_wait_secs=getattr(creator, "max_wait_secs", DEFAULT_MAX_WAIT_SECS),
        same={
            "checkpoint_dir": getattr(creator, "checkpoint_dir", None),
            "state entries": sorted(str(k) for k in state) if state is not None else None,
        },
    )


class _MonitoredSession:
    """The shared body of ``MonitoredSession`` and ``SingularMonitoredSession``."""

    def __init__(
        self,
        session_creator: SessionCreator | None,
        hooks: Sequence[SessionRunHook] | None,
        should_recover: bool,
        stop_grace_period_secs: float = 120,
        preemption: PreemptionWatcher | None = None,
        job: Job | None = _FORM,
    ) -> None:
        self._hooks: list[SessionRunHook] = list(hooks or [])
        self._preemption = preemption
        creator = session_creator or ChiefSessionCreator()
        self._job: Job | None = _form_job_for(creator) if job is _FORM else job
        # Called once the session is closed (after the hooks' end): releases resources
        # such as the checkpoint directory's writer lock.
        self._on_close: list[Callable[[], None]] = []
        self._sess: Any = None
        self._last_global_step = 0
        if preemption is not None:
            if self._job is not None:  # a signal from now on is a vote of this rank
                preemption.defer_to_job()
            # Before creation: a signal during the restore or the first save still
            # stops training cleanly at the first step boundary.
            preemption.install()
        try:
            if self._job is not None:
                self._join_job(self._job, creator)
            for hook in self._hooks:
                hook.begin()
            self._coordinated_creator = CoordinatedSessionCreator(
                session_creator=creator,
                hooks=self._hooks,
                stop_grace_period_secs=stop_grace_period_secs,
            )
            # In a job, one rank cannot re-create its session while the others wait.
            self._sess = (
                RecoverableSession(self._coordinated_creator)
                if should_recover and self._job is None
                else self._coordinated_creator.create_session()
            )
            if self._job is not None:
                tf_sess = self._coordinated_creator.tf_sess
                self._job.check_replicas(tf_sess.state if tf_sess is not None else None)
                self._job.wait_ready(
                    getattr(creator, "max_wait_secs", DEFAULT_MAX_WAIT_SECS),
                    what="restored or initialized",
                )
        except BaseException:
            if preemption is not None:
                preemption.uninstall()
            raise

    def _join_job(self, job: Job, creator: SessionCreator) -> None:
        """Make the savers, hooks and signal handling of this session the job's."""
        if self._preemption is not None:
            job.watch(self._preemption)
        join_creator = getattr(creator, "_join_job", None)
        if join_creator is not None:
            join_creator(job)
        for hook in self._hooks:
            join_hook = getattr(hook, "_join_job", None)
            if join_hook is not None:
                join_hook(job)

    @property
    def job(self) -> Job | None:
        """The torch.distributed job this session is a process of, or None."""
        return self._job

    @property
    def preemption(self) -> PreemptionWatcher | None:
        """The :class:`PreemptionWatcher` stopping this session on a signal, if any."""
        return self._preemption

    @property
    def preempted(self) -> bool:
        """True if a termination signal stopped this session (not the hooks or the data).

        After the ``with`` block, it tells a preempted run from a finished one::

            with th.MonitoredTrainingSession(...) as sess:
                while not sess.should_stop():
                    sess.run(train_step)
            if sess.preempted:
                sys.exit(128 + sess.preemption.signal_received)  # or exit_on_preemption=True
        """
        return self._preemption is not None and self._preemption.signal_received is not None

    @property
    def global_step(self) -> int:
        """The global step (read-only): the step of the checkpoint restored at creation,
        advanced by each ``run()``; after ``close()``, the last step reached.

        ``sess.run("global_step")`` is one more training step, not a way to read it.
        """
        tf_sess = self._coordinated_creator.tf_sess
        if tf_sess is not None:
            self._last_global_step = int(tf_sess.global_step)
        return self._last_global_step

    def run(
        self,
        fetches: Any,
        feed_dict: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        run_metadata: dict[str, Any] | None = None,
    ) -> Any:
        """One training step: the hooks' ``before_run``, the fetches, the hooks' ``after_run``.

        Args:
          fetches: a callable, a name, or a list/tuple/dict nesting them (see ``Session``).
          feed_dict: keyword arguments for the callables, merged with the hooks' feeds.
          options: run options, merged with the hooks' options.
          run_metadata: a dict the hooks and the step may fill.

        Returns:
          the fetched values, in the structure of ``fetches``.

        Raises:
          RuntimeError: if the session is closed, or a hook already requested a stop.
          PreemptedError: a termination signal was received (a clean stop: inside
            ``with``, the session closes normally and saves its final checkpoint).
        """
        sess = self._sess
        if sess is None:
            raise RuntimeError("Run called on a closed session; create a new monitored session.")
        if self._job is not None:
            return self._in_job(sess.run, fetches, feed_dict, options, run_metadata)
        if self._preemption is not None:
            self._preemption.check()
        return sess.run(fetches, feed_dict, options, run_metadata)

    def _in_job(self, run: Callable[..., Any], *args: Any) -> Any:
        """A step of a job: agree at a check step, then run; a lost peer ends the job."""
        job = self._job
        assert job is not None
        step = self.global_step
        if job.due(step):
            job.agree(step)
            if job.stop_agreed:
                raise errors.OutOfRangeError(
                    f"Every rank of the job stops after step {step}: a checkpoint listener of "
                    "the chief asked to stop."
                )
        if self._preemption is not None:
            self._preemption.check()
        try:
            return run(*args)
        except errors.PeerLostError:
            raise
        except Exception as e:
            if not is_peer_loss(e):
                raise
            raise errors.PeerLostError(
                f"Rank {job.rank} of {job.world_size} lost a peer during step {step + 1}: "
                f"{type(e).__name__}: {e}"
            ) from e

    def run_step_fn(self, step_fn: Callable[[StepContext], Any]) -> Any:
        """Run ``step_fn(step_context)``, a step that decides itself how to call the session.

        ``step_context.session`` is the raw session, ``step_context.run_with_hooks(...)``
        a hooked run, and ``step_context.request_stop()`` ends training. A preemption
        error inside ``step_fn`` recovers the session (MonitoredSession) and calls
        ``step_fn`` again.

        Args:
          step_fn: a function of one argument, ``step_context`` (or a method
            ``(self, step_context)``).

        Returns:
          what ``step_fn`` returns.

        Raises:
          ValueError: if ``step_fn`` has other arguments.

        Example:
            >>> import numpy as np
            >>> import trainhooks as th
            >>> state = {"w": np.zeros(3)}
            >>> def train_step():
            ...     state["w"] += 1.0
            ...     return float(state["w"][0])
            >>> def step_fn(step_context):
            ...     return step_context.run_with_hooks(train_step)
            >>> with th.MonitoredSession(th.ChiefSessionCreator(state=state)) as sess:
            ...     sess.run_step_fn(step_fn)
            1.0
        """
        step_fn_arguments = _fn_args(step_fn)
        if step_fn_arguments not in (("step_context",), ("self", "step_context")):
            raise ValueError(
                "`step_fn` may either have one `step_context` argument, or `self` and "
                "`step_context` arguments if it's an instance method. Got "
                f"{step_fn_arguments} instead."
            )
        if self._sess is None:
            raise RuntimeError("run_step_fn called on a closed session.")

        def call_step_fn(raw_session: Session, run_with_hooks: RunFn) -> Any:
            return step_fn(StepContext(raw_session, run_with_hooks))

        if self._job is not None:
            return self._in_job(self._sess.run_step_fn, call_step_fn, None)
        if self._preemption is not None:
            self._preemption.check()
        return self._sess.run_step_fn(call_step_fn, None)

    def should_stop(self) -> bool:
        """True once a hook or the step requested a stop, or the session is closed.

        An exception that a thread reported to the coordinator makes it True too (it
        is raised by ``close``); in a ``SingularMonitoredSession`` it is raised here.
        A termination signal the session's :class:`PreemptionWatcher` received makes
        it True as well.
        """
        if self._preemption is not None and self._preemption.stop_requested:
            return True
        if self._job is not None and self._job.stop_agreed:
            return True
        return self._sess is None or bool(self._sess.should_stop())

    def close(self) -> None:
        """Call every hook's ``end``, then close the session.

        Raises:
          RuntimeError: ``'Session is already closed.'`` on a second close.
          SystemExit: ``128 + signum`` after a clean close of a session stopped by a
            signal, when its watcher was made with ``exit_after_close=True``.
        """
        self._close_internal()
        self._exit_if_preempted()

    def __enter__(self) -> _MonitoredSession:
        return self

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exception_type is not None and issubclass(exception_type, errors.CLEAN_STOP_ERRORS):
            exception_type = None
        self._close_internal(exception_type)
        if exception_type is None:
            self._exit_if_preempted()
        # Returning True swallows the exception: only for a clean stop.
        return exception_type is None

    def _exit_if_preempted(self) -> None:
        watcher = self._preemption
        if watcher is not None and watcher.exit_after_close and self.preempted:
            signum = watcher.signal_received
            assert signum is not None
            logger.info(
                "Closed cleanly after signal %d; exiting with status %d so that the job is "
                "requeued.",
                signum,
                128 + signum,
            )
            raise SystemExit(128 + signum)

    def _close_internal(self, exception_type: type[BaseException] | None = None) -> None:
        self.global_step  # noqa: B018  # remember the last step before the session goes
        try:
            if exception_type is None:
                raw = self._coordinated_creator.tf_sess
                for hook in self._hooks:
                    hook.end(raw)  # type: ignore[arg-type]  # None on a second close, as TF
        finally:
            try:
                if self._sess is None:
                    raise RuntimeError("Session is already closed.")
                self._sess.close()
            finally:
                self._sess = None
                self._coordinated_creator.tf_sess = None
                self._coordinated_creator.coord = None
                self._release()

    def _release(self) -> None:
        """Restore the signal handlers and run the close callbacks, each once."""
        if self._preemption is not None:
            self._preemption.uninstall()
        callbacks, self._on_close = self._on_close, []
        for callback in reversed(callbacks):
            callback()

    def _is_closed(self) -> bool:
        return self._sess is None

    def _tf_sess(self) -> Session | None:
        return self._coordinated_creator.tf_sess


class MonitoredSession(_MonitoredSession):
    """A session that runs hooks around each step and recovers from preemption errors.

    Args:
      session_creator: makes the raw session; default ``ChiefSessionCreator()``.
      hooks: the :class:`~trainhooks.SessionRunHook` s, called in this order.
      stop_grace_period_secs: how long ``close`` waits for coordinator threads.
      preemption: a :class:`~trainhooks.session.preemption.PreemptionWatcher` that
        stops training at the next step boundary on SIGTERM (or the signals it
        names); installed while the session is open. None: signals keep their
        current handlers.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> import trainhooks as th
        >>> state = {"w": np.zeros(3)}
        >>> def train_step():
        ...     state["w"] += 1.0
        >>> creator = th.ChiefSessionCreator(state=state, checkpoint_dir=tempfile.mkdtemp())
        >>> hooks = [th.StopAtStepHook(last_step=3)]
        >>> with MonitoredSession(session_creator=creator, hooks=hooks) as sess:
        ...     while not sess.should_stop():
        ...         sess.run(train_step)
        >>> state["w"]
        array([3., 3., 3.])
    """

    def __init__(
        self,
        session_creator: SessionCreator | None = None,
        hooks: Sequence[SessionRunHook] | None = None,
        stop_grace_period_secs: float = 120,
        *,
        preemption: PreemptionWatcher | None = None,
        _job: Job | None = _FORM,
    ) -> None:
        super().__init__(
            session_creator,
            hooks,
            should_recover=True,
            stop_grace_period_secs=stop_grace_period_secs,
            preemption=preemption,
            job=_job,
        )


class SingularMonitoredSession(_MonitoredSession):
    """A monitored session for a single process: hooks but no recovery.

    Preemption errors propagate like any other error. ``raw_session()`` gives the raw
    :class:`~trainhooks.Session` (None once closed).

    Args:
      hooks: the hooks, called in this order.
      scaffold: the :class:`Scaffold`; default ``Scaffold()``.
      master: accepted for TF compatibility; unused.
      config: accepted for TF compatibility; unused.
      checkpoint_dir: restore the latest checkpoint from this directory.
      stop_grace_period_secs: how long ``close`` waits for coordinator threads.
      checkpoint_filename_with_path: restore this checkpoint prefix instead.
      state: the training state (shortcut for ``Scaffold(state=...)``).
      advance_global_step: False when the step function advances the global step itself.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> state = {"w": np.zeros(3)}
        >>> def train_step():
        ...     state["w"] += 1.0
        >>> with SingularMonitoredSession(state=state, checkpoint_dir=tempfile.mkdtemp()) as sess:
        ...     sess.run(train_step)
        ...     sess.raw_session().global_step
        1
    """

    def __init__(
        self,
        hooks: Sequence[SessionRunHook] | None = None,
        scaffold: Scaffold | None = None,
        master: str = "",
        config: Any = None,
        checkpoint_dir: str | None = None,
        stop_grace_period_secs: float = 120,
        checkpoint_filename_with_path: str | None = None,
        *,
        state: Mapping[str, Any] | None = None,
        advance_global_step: bool = True,
    ) -> None:
        session_creator = ChiefSessionCreator(
            scaffold=scaffold,
            master=master,
            config=config,
            checkpoint_dir=checkpoint_dir,
            checkpoint_filename_with_path=checkpoint_filename_with_path,
            state=state,
            advance_global_step=advance_global_step,
        )
        super().__init__(
            session_creator,
            hooks,
            should_recover=False,
            stop_grace_period_secs=stop_grace_period_secs,
        )

    def raw_session(self) -> Session | None:
        """The raw session, or None once closed."""
        return self._tf_sess()
