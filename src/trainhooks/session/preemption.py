"""Preemption: a termination signal becomes a clean stop at the next step boundary.

Schedulers announce a preemption with SIGTERM and kill the process a grace period
later. A :class:`PreemptionWatcher` installed by a monitored session turns the signal
into a stop request: the step in progress finishes, ``should_stop()`` turns True, and
the next ``run`` raises :class:`PreemptedError` (an ``OutOfRangeError``, so a ``with``
block ends cleanly). Closing the session then runs the hooks' ``end``; the
``CheckpointSaverHook`` saves the last completed step there.

The signal handler only sets a flag and starts a watchdog: nothing is saved from
inside the handler, where the state may be half-updated. If the session has not
closed ``grace_period_secs`` after the signal (a step hangs, the loop never checks),
the watchdog logs an error and ends the process with status ``128 + signum``; the
commit protocol keeps every listed checkpoint intact whatever instant that is.

In a torch.distributed job (``session/job.py``) the watcher is deferred: a signal
received by one rank is only a vote. The ranks agree at a step boundary, every rank
stops there, and only then does ``stop_requested`` turn True; the grace period still
runs from the moment the signal arrived.

Handlers can only be installed from the main thread; elsewhere the watcher logs a
WARNING and stays inert. The previous handlers are restored on close.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from trainhooks import errors

__all__ = ["DEFAULT_GRACE_PERIOD_SECS", "PreemptedError", "PreemptionWatcher"]

logger = logging.getLogger(__name__)

#: A little below Kubernetes' default 30 s between SIGTERM and SIGKILL.
DEFAULT_GRACE_PERIOD_SECS = 25.0

#: What to do when the grace period runs out: called with the signal number.
OnGraceExpired = Callable[[int], None]


class PreemptedError(errors.OutOfRangeError):
    """Training was stopped by a termination signal; a monitored session ends cleanly.

    Attributes:
      signum: the signal received.
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _exit_now(signum: int) -> None:
    # os._exit: the main thread is stuck, so neither atexit nor finally blocks would run.
    logging.shutdown()
    os._exit(128 + signum)


class PreemptionWatcher:
    """Turns termination signals into a clean stop of a monitored session.

    ``MonitoredTrainingSession`` creates one (``preemption_signals=``,
    ``preemption_grace_period_secs=``); pass one as ``MonitoredSession(preemption=...)``
    to get the same behaviour from another session.

    Args:
      signals: the signals that mean "stop": SIGTERM by default; SIGINT, SIGUSR1, ...
        may be added.
      grace_period_secs: after the first signal, how long the session may take to
        reach a step boundary and close (final checkpoint included) before the
        process is ended; None waits forever.
      on_grace_expired: called on the watchdog thread when the grace period runs out;
        by default it logs and exits the process with status ``128 + signum``.
      exit_after_close: once a session stopped by a signal has closed cleanly (final
        checkpoint saved, hooks' ``end`` run), exit the process with status
        ``128 + signum`` (``SystemExit``), as a process killed by that signal would
        report it, so that a scheduler requeues the job. False: the session's ``with``
        block ends normally and ``sess.preempted`` tells the program.

    Raises:
      ValueError: a signal is not a valid signal number, or the grace period is negative.

    Example:
        >>> import signal
        >>> watcher = PreemptionWatcher(signals=[signal.SIGTERM, signal.SIGUSR1])
        >>> watcher.install()  # from the main thread
        True
        >>> watcher.stop_requested
        False
        >>> watcher.uninstall()
    """

    def __init__(
        self,
        signals: Iterable[int] = (signal.SIGTERM,),
        grace_period_secs: float | None = DEFAULT_GRACE_PERIOD_SECS,
        *,
        on_grace_expired: OnGraceExpired | None = None,
        exit_after_close: bool = False,
    ) -> None:
        self.exit_after_close = bool(exit_after_close)
        self._signals: list[int] = []
        valid = signal.valid_signals()
        for s in signals:
            if s not in valid or s in (getattr(signal, "SIGKILL", None), signal.SIGSEGV):
                raise ValueError(
                    f"preemption signal {s!r} cannot be handled; pass signal numbers such "
                    "as signal.SIGTERM, signal.SIGINT or signal.SIGUSR1."
                )
            if int(s) not in self._signals:
                self._signals.append(int(s))
        if grace_period_secs is not None and grace_period_secs < 0:
            raise ValueError(
                f"grace_period_secs must be >= 0 or None (no limit), got {grace_period_secs!r}."
            )
        self._grace_period_secs = grace_period_secs
        self._on_grace_expired = on_grace_expired or _exit_now
        self._previous: dict[int, Any] = {}
        self._signum: int | None = None
        self._pending: int | None = None
        self._deferred = False
        self._closed = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def signals(self) -> list[int]:
        """The signals this watcher handles."""
        return list(self._signals)

    @property
    def installed(self) -> bool:
        """True while the handlers are installed."""
        return bool(self._previous)

    @property
    def stop_requested(self) -> bool:
        """True once one of the signals was received (or :meth:`request_stop` called)."""
        return self._signum is not None

    @property
    def signal_received(self) -> int | None:
        """The first signal received, or None."""
        return self._signum

    def install(self) -> bool:
        """Install the handlers, remembering the previous ones.

        Returns:
          True if installed; False (with a WARNING) when not called from the main
          thread, where Python cannot install signal handlers.
        """
        if self._previous or not self._signals:
            return bool(self._previous)
        if threading.current_thread() is not threading.main_thread():
            logger.warning(
                "Not in the main thread: %s will not stop training cleanly (create the "
                "session in the main thread to save a final checkpoint on preemption).",
                ", ".join(_signal_name(s) for s in self._signals),
            )
            return False
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return True

    def uninstall(self) -> None:
        """Restore the previous handlers and cancel the grace-period watchdog.

        A handler that someone else replaced ours with in the meantime is left alone.
        """
        self._closed.set()
        if not self._previous:
            return
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Cannot restore signal handlers outside the main thread.")
            return
        previous, self._previous = self._previous, {}
        for s, handler in previous.items():
            if signal.getsignal(s) == self._handle:
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """Act as if ``signum`` had been received (what the handler calls).

        The first call starts the grace-period watchdog; a second one, while the
        session is still stopping, ends the process at once (an impatient operator).
        When deferred to a job, the stop waits for the ranks to agree (:meth:`agree`).
        """
        if self._signum is not None or self._pending is not None:
            if not self._closed.is_set():
                logger.error("Received %s again while stopping; exiting now.", _signal_name(signum))
                self._on_grace_expired(signum)
            return
        if self._deferred:
            self._pending = signum
            logger.warning(
                "Received %s: every rank of the job stops at the next step boundary they "
                "agree on, and a final checkpoint is saved.",
                _signal_name(signum),
            )
        else:
            self._signum = signum
            logger.warning(
                "Received %s: stopping at the next step boundary and saving a final checkpoint.",
                _signal_name(signum),
            )
        self._start_watchdog(signum)

    def defer_to_job(self) -> None:
        """Make a received signal a vote that the job's ranks agree on (``session/job.py``).

        A signal received before (not yet acted on) becomes this rank's vote too.
        """
        self._deferred = True
        if self._signum is not None and self._pending is None:
            self._pending, self._signum = self._signum, None

    @property
    def pending_signal(self) -> int | None:
        """A signal this process received that the job has not yet agreed on, or None."""
        return self._pending

    def agree(self, signum: int) -> None:
        """The job agreed to stop at this step boundary because of ``signum``.

        On the rank that received it, the stop now takes effect; on the others, it is as
        if the signal had arrived now (the grace period starts).
        """
        if self._signum is not None:
            return
        self._signum = signum
        if self._pending is None:
            logger.warning(
                "Another rank of the job received %s: stopping at this step boundary and "
                "saving a final checkpoint.",
                _signal_name(signum),
            )
            self._start_watchdog(signum)
        self._pending = None

    def _start_watchdog(self, signum: int) -> None:
        if self._grace_period_secs is not None and not self._closed.is_set():
            self._watchdog = threading.Thread(
                target=self._watch, args=(signum,), name="trainhooks-preemption", daemon=True
            )
            self._watchdog.start()

    def check(self) -> None:
        """Raise :class:`PreemptedError` if a stop was requested; called before each run."""
        signum = self._signum
        if signum is not None:
            raise PreemptedError(
                f"Training stopped by {_signal_name(signum)} at a step boundary.", signum
            )

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop(signum)

    def _watch(self, signum: int) -> None:
        assert self._grace_period_secs is not None
        if self._closed.wait(self._grace_period_secs):
            return
        logger.error(
            "The session did not stop within %s s of %s; exiting with status %d. Every "
            "listed checkpoint is intact; the last one is restored on restart.",
            self._grace_period_secs,
            _signal_name(signum),
            128 + signum,
        )
        self._on_grace_expired(signum)

    def __repr__(self) -> str:
        names = ", ".join(_signal_name(s) for s in self._signals)
        return (
            f"PreemptionWatcher(signals=[{names}], grace_period_secs={self._grace_period_secs}, "
            f"installed={self.installed}, stop_requested={self.stop_requested})"
        )
