"""The layers a monitored session is made of (TF's ``_WrappedSession`` family).

``MonitoredSession`` = ``_RecoverableSession(_CoordinatedSession(HookedSession(raw)))``;
``SingularMonitoredSession`` leaves out the recoverable layer. Each layer adds one
concern to ``run``, ``should_stop`` and ``close``:

* ``_CoordinatedSession`` raises what a thread reported to the ``Coordinator`` and
  stops and joins the threads on close;
* ``_RecoverableSession`` re-creates the session and retries the run on a
  preemption error (:func:`preemption_errors`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from trainhooks import errors
from trainhooks.session.coordinator import Coordinator
from trainhooks.session.creators import SessionCreator
from trainhooks.session.hooked import HookedSession
from trainhooks.session.run_hook import SessionRunHook
from trainhooks.session.session import Session

__all__ = ["CoordinatedSessionCreator", "RecoverableSession", "preemption_errors"]

logger = logging.getLogger(__name__)

#: ``run`` of a hooked session, as handed to a step function's ``run_with_hooks``.
RunFn = Callable[..., Any]
#: Calls the user's step function with a ``StepContext(raw_session, run_with_hooks)``.
StepCaller = Callable[[Session, RunFn], Any]


def preemption_errors() -> tuple[type[BaseException], ...]:
    """The errors that make a ``MonitoredSession`` re-create its session and retry.

    ``AbortedError`` and ``UnavailableError``, plus the errors ``torch.distributed``
    raises for a lost peer (``DistBackendError``, ``DistNetworkError``) when torch is
    already imported. Only evaluated while an exception propagates, so it costs the
    step loop nothing.
    """
    found = errors.PREEMPTION_ERRORS
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        for name in ("DistBackendError", "DistNetworkError"):
            cls = getattr(dist, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found = (*found, cls)
    return found


class _Stoppable(Protocol):
    def should_stop(self) -> bool: ...

    def close(self) -> None: ...


class _WrappedSession:
    """A layer around a session; ``should_stop`` asks this layer, then the inner one."""

    def __init__(self, sess: Any) -> None:
        self._sess = sess

    def _check_stop(self) -> bool:
        raise NotImplementedError

    def should_stop(self) -> bool:
        if self._check_stop():
            return True
        if self._sess is not None:
            return bool(self._sess.should_stop())
        return True

    def close(self) -> None:
        if self._sess is None:
            return
        try:
            self._sess.close()
        except preemption_errors() as e:
            logger.error(
                "An error occurred when attempting to close the session. This may be due to "
                "a preemption in a connected worker or parameter server. Error: %s",
                e,
            )
        finally:
            self._sess = None


class _CoordinatedSession(_WrappedSession):
    """Surfaces the coordinator's errors; on close stops and joins the coordinator's threads."""

    _sess: HookedSession | None

    def __init__(
        self, sess: HookedSession, coord: Coordinator, stop_grace_period_secs: float = 120
    ) -> None:
        super().__init__(sess)
        self._coord = coord
        self._stop_grace_period_secs = stop_grace_period_secs

    @property
    def raw_session(self) -> Session:
        assert self._sess is not None
        return self._sess.raw_session

    def _check_stop(self) -> bool:
        # An exception a thread reported is raised here, on the training thread.
        self._coord.raise_requested_exception()
        return self._coord.should_stop()

    def close(self) -> None:
        self._coord.request_stop()
        try:
            self._coord.join(
                stop_grace_period_secs=self._stop_grace_period_secs, ignore_live_threads=True
            )
        finally:
            try:
                super().close()
            except Exception:
                # The useful exception, if any, was already raised by join().
                pass

    def run(
        self,
        fetches: Any,
        feed_dict: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        run_metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Run one hooked step; raise a preemption error a thread reported instead of its consequence."""
        try:
            return self._sess.run(fetches, feed_dict, options, run_metadata)  # type: ignore[union-attr]
        except preemption_errors():
            raise
        except Exception as original:
            # A failure here may be a consequence of a preemption a thread reported to
            # the coordinator; if so raise that root cause instead.
            try:
                self._coord.raise_requested_exception()
            except preemption_errors():
                raise
            except Exception:
                pass
            raise original

    def run_step_fn(self, call_step_fn: StepCaller, run_with_hooks: RunFn | None) -> Any:
        return call_step_fn(self.raw_session, run_with_hooks or self.run)


class CoordinatedSessionCreator:
    """Creates a raw session, a new coordinator, calls ``after_create_session``, and wraps.

    ``tf_sess`` and ``coord`` are those of the session created last.
    """

    def __init__(
        self,
        session_creator: SessionCreator,
        hooks: Sequence[SessionRunHook],
        stop_grace_period_secs: float,
    ) -> None:
        self._session_creator = session_creator
        self._hooks = hooks
        self._stop_grace_period_secs = stop_grace_period_secs
        self.tf_sess: Session | None = None
        self.coord: Coordinator | None = None

    def create_session(self) -> _CoordinatedSession:
        self.tf_sess = self._session_creator.create_session()
        # The coordinator of a monitored session swallows no exception.
        self.coord = Coordinator(clean_stop_exception_types=[])
        for hook in self._hooks:
            hook.after_create_session(self.tf_sess, self.coord)
        return _CoordinatedSession(
            HookedSession(self.tf_sess, self._hooks), self.coord, self._stop_grace_period_secs
        )


class RecoverableSession(_WrappedSession):
    """Re-creates the session and retries the call when a preemption error is raised."""

    _sess: _CoordinatedSession | None

    def __init__(self, sess_creator: CoordinatedSessionCreator) -> None:
        self._sess_creator = sess_creator
        super().__init__(self._create_session())

    def _create_session(self) -> _CoordinatedSession:
        while True:
            try:
                return self._sess_creator.create_session()
            except preemption_errors() as e:
                logger.info(
                    "An error was raised while a session was being created. This may be due "
                    "to a preemption of a connected worker or parameter server. A new session "
                    "will be created. Error: %s",
                    e,
                )

    def _recover(self, error: BaseException) -> None:
        logger.info(
            "An error was raised. This may be due to a preemption in a connected worker or "
            "parameter server. The current session will be closed and a new session will be "
            "created. Error: %s",
            error,
        )
        self.close()
        self._sess = None

    def _check_stop(self) -> bool:
        try:
            if self._sess is None:
                return True
            return self._sess._check_stop()
        except preemption_errors() as e:
            logger.info(
                "An error was raised while considering whether the session is complete. This "
                "may be due to a preemption in a connected worker or parameter server. The "
                "current session will be closed and a new session will be created. Error: %s",
                e,
            )
            self.close()
            self._sess = self._create_session()
            # The session was just re-created: the computation should go on.
            return False
        except Exception:
            # should_stop() answers True rather than raising; close() raises the error.
            return True

    def run(
        self,
        fetches: Any,
        feed_dict: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        run_metadata: dict[str, Any] | None = None,
    ) -> Any:
        while True:
            try:
                if self._sess is None:
                    self._sess = self._create_session()
                return self._sess.run(fetches, feed_dict, options, run_metadata)
            except preemption_errors() as e:
                self._recover(e)

    def run_step_fn(self, call_step_fn: StepCaller, run_with_hooks: RunFn | None) -> Any:
        while True:
            try:
                if self._sess is None:
                    self._sess = self._create_session()
                return self._sess.run_step_fn(call_step_fn, self._sess.run)
            except preemption_errors() as e:
                self._recover(e)
