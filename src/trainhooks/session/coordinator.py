"""``Coordinator``: TF's helper that lets threads stop together and report their errors.

A monitored session makes a new coordinator for every (re)created session and hands
it to each hook's ``after_create_session``; a hook that starts threads registers them
with it. An exception reported with :meth:`Coordinator.request_stop` stops every
thread and is raised again on the training thread (``should_stop``/``close``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from types import TracebackType

from trainhooks import errors

__all__ = ["Coordinator"]

logger = logging.getLogger(__name__)

#: What ``request_stop(ex=...)`` accepts: an exception, or a ``sys.exc_info()`` tuple.
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class Coordinator:
    """Coordinates the termination of a set of threads (TF's ``tf.train.Coordinator``).

    Threads check :meth:`should_stop` in their loop and call :meth:`request_stop`
    (with the exception, if they failed); the main thread calls :meth:`join`, which
    waits for the threads and re-raises the first exception that was reported.

    Args:
      clean_stop_exception_types: exception types that request a stop *without* being
        reported as errors. Default: ``(OutOfRangeError,)``; a monitored session passes
        ``[]`` so that nothing is swallowed.

    Example:
        >>> import threading
        >>> coord = Coordinator()
        >>> def worker():
        ...     with coord.stop_on_exception():
        ...         while not coord.should_stop():
        ...             coord.request_stop()          # the work is done
        >>> threads = [threading.Thread(target=worker) for _ in range(2)]
        >>> for t in threads:
        ...     t.start()
        >>> coord.join(threads)
    """

    def __init__(
        self, clean_stop_exception_types: Iterable[type[BaseException]] | None = None
    ) -> None:
        if clean_stop_exception_types is None:
            clean_stop_exception_types = (errors.OutOfRangeError,)
        self._clean_stop_exception_types = tuple(clean_stop_exception_types)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._exception: BaseException | None = None
        self._joined = False
        self._registered_threads: set[threading.Thread] = set()

    @property
    def clean_stop_exception_types(self) -> tuple[type[BaseException], ...]:
        """The exception types that stop the threads without being reported as errors."""
        return self._clean_stop_exception_types

    def request_stop(self, ex: BaseException | ExcInfo | None = None) -> None:
        """Request that the threads stop; ``should_stop()`` returns True afterwards.

        Args:
          ex: the exception that made a thread stop (an exception or a ``sys.exc_info()``
            tuple), or None. The first one reported is kept and raised by :meth:`join`
            and :meth:`raise_requested_exception`, unless its type is one of
            ``clean_stop_exception_types``. If :meth:`join` already returned, ``ex`` is
            raised right away.
        """
        exception = _as_exception(ex)
        if isinstance(exception, self._clean_stop_exception_types):
            exception = None
        with self._lock:
            if self._joined and exception is not None:
                raise exception
            if not self._stop_event.is_set():
                if exception is not None and self._exception is None:
                    logger.info("Error reported to Coordinator: %s, %s", type(exception), exception)
                    self._exception = exception
                self._stop_event.set()

    def clear_stop(self) -> None:
        """Clear the stop request and the reported exception, so the coordinator can be reused."""
        with self._lock:
            self._joined = False
            self._exception = None
            self._stop_event.clear()

    def should_stop(self) -> bool:
        """True once a stop has been requested."""
        return self._stop_event.is_set()

    @contextlib.contextmanager
    def stop_on_exception(self) -> Iterator[None]:
        """A context manager that reports any exception raised in its body with ``request_stop``.

        Example:
            >>> coord = Coordinator()
            >>> with coord.stop_on_exception():
            ...     raise ValueError("worker failed")
            >>> coord.should_stop()
            True
        """
        try:
            yield
        except BaseException as e:
            self.request_stop(e)

    def wait_for_stop(self, timeout: float | None = None) -> bool:
        """Block until a stop is requested or ``timeout`` seconds pass.

        Returns:
          True if a stop was requested, False if the timeout expired first.
        """
        return self._stop_event.wait(timeout)

    def register_thread(self, thread: threading.Thread) -> None:
        """Add ``thread`` to the threads that :meth:`join` waits for."""
        with self._lock:
            self._registered_threads.add(thread)

    def join(
        self,
        threads: Iterable[threading.Thread] | None = None,
        stop_grace_period_secs: float = 120,
        ignore_live_threads: bool = False,
    ) -> None:
        """Wait for the threads to finish, then raise the first reported exception, if any.

        It waits until every thread has ended or a stop was requested; then it gives
        the threads ``stop_grace_period_secs`` to end. Threads registered after this
        call starts are not waited for.

        Args:
          threads: threads to wait for besides the registered ones.
          stop_grace_period_secs: how long threads may take to end after a stop request.
          ignore_live_threads: if True, threads still alive after the grace period are
            only logged; otherwise they raise ``RuntimeError``.

        Raises:
          BaseException: the exception passed to :meth:`request_stop`, if any.
          RuntimeError: if threads are still running after the grace period and
            ``ignore_live_threads`` is False.
        """
        with self._lock:
            waited = set(self._registered_threads)
            if threads is not None:
                waited.update(threads)
            to_join = list(waited)

        while any(t.is_alive() for t in to_join) and not self.wait_for_stop(0.05):
            pass

        # Threads may still be shutting down: wait with growing pauses, at most the grace period.
        remaining = float(stop_grace_period_secs)
        pause = 0.001
        while any(t.is_alive() for t in to_join) and remaining >= 0.0:
            time.sleep(pause)
            remaining -= pause
            pause = max(min(2 * pause, remaining), 0.001)

        stragglers = [t.name for t in to_join if t.is_alive()]
        with self._lock:
            self._joined = True
            self._registered_threads = set()
            if self._exception is not None:
                raise self._exception
            if stragglers:
                message = "Coordinator stopped with threads still running: " + " ".join(stragglers)
                if not ignore_live_threads:
                    raise RuntimeError(message)
                logger.info(message)

    @property
    def joined(self) -> bool:
        """True once :meth:`join` has returned (or raised)."""
        return self._joined

    def raise_requested_exception(self) -> None:
        """Raise the exception passed to :meth:`request_stop`, if there was one."""
        with self._lock:
            if self._exception is not None:
                raise self._exception


def _as_exception(ex: BaseException | ExcInfo | None) -> BaseException | None:
    if ex is None or isinstance(ex, BaseException):
        return ex
    if isinstance(ex, tuple) and len(ex) == 3 and isinstance(ex[1], BaseException):
        return ex[1]
    raise ValueError(
        f"ex must be an exception or a sys.exc_info() tuple of a raised exception, got {ex!r}."
    )
