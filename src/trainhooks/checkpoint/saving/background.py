"""``BackgroundWriter``: one thread that runs one save at a time, off the training thread.

A background save (``docs/internals.md``) is a job handed over by ``Saver.save``: write the
snapshot, commit it, update the state file, apply retention. The writer runs at most
one job at a time; :meth:`BackgroundWriter.submit` refuses a second while one runs, so
the caller waits first (:meth:`BackgroundWriter.wait`).

Results and errors come back to the training thread, never lost:

* :meth:`~BackgroundWriter.poll` returns, without blocking, what the jobs finished since
  the last call returned; once those are taken, the error of a failed job is raised;
* :meth:`~BackgroundWriter.wait` blocks until the job in flight is done and raises its
  error;
* at interpreter exit, a job still in flight is finished before the process ends (an
  ``atexit`` handler waits for it), and an error nobody collected is logged. If the
  process dies without running ``atexit`` (SIGKILL, ``os._exit``), the job is simply
  cut short: the commit protocol leaves only a temporary directory, which the next
  save removes, and the state file never names the unfinished checkpoint.

Each job runs on its own short-lived daemon thread (never two at once), so an idle
writer holds no thread and never keeps the process alive.

On Linux the job's thread runs at idle priority (``SCHED_IDLE``), and so do the
threads it starts (they inherit it): the save uses only CPU time that the training
loop leaves free, so the loop keeps its speed while the save runs (measurements in
``benchmarks/README.md``). Once someone waits for the job (:meth:`~BackgroundWriter.wait`,
which ``Saver.save`` calls before the next save), nothing is gained by holding it back:
its threads are returned to normal priority where the OS lets a process raise a
thread's priority again (root, ``CAP_SYS_NICE``, or ``RLIMIT_NICE`` of 20 or more).
Elsewhere the job stays at idle priority; it still gets every core that no other
thread wants, including the one the waiting thread has just given up, but on a
machine kept busy by other processes it is slowed down until they pause.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

__all__ = ["BackgroundWriter", "lower_thread_priority"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_LIVE_WRITERS: weakref.WeakSet[BackgroundWriter[Any]] = weakref.WeakSet()


class BackgroundWriter(Generic[T]):
    """Runs one job at a time on a background thread; results and errors come back.

    Args:
      name: the thread's name (shows in stack dumps and profilers).
      idle_priority: run jobs at idle priority where the OS has one (Linux
        ``SCHED_IDLE``): they get a core only when no normal thread wants it.

    Example:
        >>> writer = BackgroundWriter[str]()
        >>> writer.submit("model.ckpt-1", lambda: "model.ckpt-1")
        >>> writer.wait()
        >>> writer.poll()
        ['model.ckpt-1']
        >>> writer.close()
    """

    def __init__(
        self, name: str = "trainhooks-checkpoint-writer", *, idle_priority: bool = True
    ) -> None:
        self._name = name
        self._idle_priority = idle_priority
        self._cond = threading.Condition()
        self._job: tuple[str, Callable[[], T]] | None = None
        self._done: list[T] = []
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # Priority bookkeeping, under _cond: whether the job's threads were lowered,
        # whether someone waits for the job (then they are raised again), and the
        # threads that existed before the job (never touched).
        self._lowered = False
        self._waited_for = False
        self._threads_before: set[int | None] = set()

    @property
    def in_flight(self) -> str | None:
        """The label of the job running now (for a save: its prefix), or None."""
        with self._cond:
            return None if self._job is None else self._job[0]

    def submit(self, label: str, job: Callable[[], T]) -> None:
        """Start ``job`` on the background thread and return at once.

        Args:
          label: what the job is, for :attr:`in_flight` and error messages.
          job: called with no arguments on the background thread; its result goes to
            :meth:`poll`, an exception it raises to :meth:`poll` or :meth:`wait`.

        Raises:
          RuntimeError: a job is still in flight; call :meth:`wait` first.
        """
        with self._cond:
            if self._job is not None:
                raise RuntimeError(
                    f"a background save ({self._job[0]}) is still in flight; call wait() "
                    f"before submitting {label}"
                )
            self._job = (label, job)
            self._lowered = self._waited_for = False
            self._threads_before = {t.ident for t in threading.enumerate()}
            # One short-lived thread per job: an idle writer holds no thread, and a
            # Saver that is dropped without close() leaks nothing.
            self._thread = threading.Thread(target=self._run, args=(job,), name=self._name)
            self._thread.daemon = True
            _LIVE_WRITERS.add(self)
            self._thread.start()

    def wait(self, *, raise_error: bool = True) -> None:
        """Block until no job is in flight.

        Args:
          raise_error: raise the error of a failed job (once; it is then cleared).
            False leaves it for a later :meth:`wait` or :meth:`poll`.
        """
        with self._cond:
            if self._job is not None:
                self._waited_for = True
                if self._lowered:
                    self._lowered = not _restore_priority(self._threads_before)
            while self._job is not None:
                self._cond.wait()
            if raise_error:
                self._raise_error()

    def poll(self) -> list[T]:
        """The results of jobs finished since the last call, oldest first; never blocks.

        Raises:
          BaseException: a job failed and every result before it was already returned;
            its error is raised here, once.
        """
        with self._cond:
            done, self._done = self._done, []
            if not done:
                self._raise_error()
            return done

    def close(self) -> None:
        """Wait for the job in flight (raising its error) and for its thread to end.

        The writer can be used again afterwards.
        """
        try:
            self.wait()
        finally:
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            _LIVE_WRITERS.discard(self)

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, job: Callable[[], T]) -> None:
        if self._idle_priority:
            with self._cond:
                if not self._waited_for:  # else the caller already waits: full speed
                    self._lowered = lower_thread_priority()
        try:
            result = job()
        except BaseException as e:  # handed to the training thread, never lost
            self._finish([], e)
        else:
            self._finish([result], None)

    def _finish(self, results: list[T], error: BaseException | None) -> None:
        with self._cond:
            self._done.extend(results)
            if error is not None:
                self._error = error
            self._job = None
            self._cond.notify_all()

    def _finish_at_exit(self) -> None:
        """At interpreter exit: finish the job in flight; log an error nobody collected."""
        label = self.in_flight
        if label is not None:
            logger.info("Waiting for the background save of %s to finish before exit.", label)
        try:
            self.close()
        except BaseException as e:
            logger.error("A background checkpoint save failed and was never reported: %r", e)


def lower_thread_priority() -> bool:
    """Move the calling thread to idle priority (Linux ``SCHED_IDLE``); threads it starts inherit it.

    An idle-priority thread runs only on a core that no normal thread wants, and a
    normal thread that wakes up takes the core from it at once. Threads, unlike
    processes, have their own policy on Linux, so this leaves the rest of the process
    alone.

    Returns:
      True if the priority was lowered; False where the OS has no idle policy (macOS,
      Windows) or refuses it (a seccomp filter): the thread then keeps its priority.

    Example:
        >>> import threading
        >>> threading.Thread(target=lower_thread_priority).start()
    """
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return False
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError as e:
        logger.debug("Could not lower the checkpoint writer's priority: %s", e)
        return False
    return True


def _restore_priority(threads_before: set[int | None]) -> bool:
    """Return the threads started since ``threads_before`` from idle to normal priority.

    Returns False if the OS refuses (an unprivileged process cannot leave SCHED_IDLE
    unless its ``RLIMIT_NICE`` allows nice 0); the threads then stay at idle priority.
    """
    for thread in threading.enumerate():
        tid = thread.native_id
        if thread.ident in threads_before or tid is None:
            continue
        try:
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as e:
            logger.debug("The background save stays at idle priority: %s", e)
            return False
    return True


@atexit.register
def _finish_all_at_exit() -> None:
    for writer in list(_LIVE_WRITERS):
        writer._finish_at_exit()
