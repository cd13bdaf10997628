"""TensorBoard summaries: ``SummarySaverHook`` and the per-directory ``SummaryWriterCache``.

Event files are written with tensorboardX's event-file writer and protocol buffers, so
TensorBoard reads them without TensorFlow. tensorboardX is imported only when a
writer is first created.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from trainhooks._clock import Clock, wall_clock
from trainhooks.hooks.timers import SecondOrStepTimer
from trainhooks.session.run_hook import (
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

if TYPE_CHECKING:
    from trainhooks.session.session import Session

__all__ = ["EventFileWriter", "ScalarSummaryWriter", "SummarySaverHook", "SummaryWriterCache"]

logger = logging.getLogger(__name__)


class ScalarSummaryWriter(Protocol):
    """What the summary hooks write to: an :class:`EventFileWriter`, a
    ``tensorboardX.SummaryWriter``, or anything with these two methods."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any: ...

    def flush(self) -> Any: ...


class EventFileWriter:
    """Writes TensorBoard events into a new event file in ``logdir``, on the calling thread.

    Unlike ``tensorboardX.SummaryWriter``, whose background queue can still hold
    events when its ``flush`` returns, ``flush`` here means the events are in the
    file. Writes are buffered and flushed at least every ``flush_secs`` seconds (when
    the next event arrives), on ``flush`` and on ``close``.

    Args:
      logdir: the directory (created if needed).
      flush_secs: the longest time an event stays buffered while others arrive.

    Example:
        >>> import tempfile
        >>> writer = EventFileWriter(tempfile.mkdtemp())
        >>> writer.add_scalar("loss", 0.5, global_step=1)
        >>> writer.close()
    """

    _file_numbers = itertools.count()

    def __init__(self, logdir: str | os.PathLike[str], *, flush_secs: float = 120.0) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self._logdir = os.fspath(logdir)
        if "://" not in self._logdir:
            os.makedirs(self._logdir, exist_ok=True)
        # tensorboardX names files by the second only. TensorBoard reads a directory's
        # files in name order, and a restarted job's SessionLog(START) only discards
        # older events if its file sorts after them: nanoseconds keep that order within
        # a second, pid and a counter keep files of concurrent writers apart.
        suffix = f".{time.time_ns()}.{os.getpid()}.{next(EventFileWriter._file_numbers)}"
        self._writer = EventsWriter(os.path.join(self._logdir, "events"), suffix)
        self._flush_secs = flush_secs
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def logdir(self) -> str:
        return self._logdir

    def add_event(self, event: Any) -> None:
        """Append an ``Event`` protocol buffer (``tensorboardX.proto.event_pb2.Event``)."""
        with self._lock:
            if self._closed:
                raise ValueError(
                    f"The event writer for {self._logdir!r} is closed; get an open one with "
                    "SummaryWriterCache.get(logdir)."
                )
            self._writer.write_event(event)
            if time.monotonic() - self._last_flush >= self._flush_secs:
                self._flush_locked()

    def add_scalar(
        self,
        tag: str,
        scalar_value: Any,
        global_step: int | None = None,
        walltime: float | None = None,
    ) -> None:
        """Write ``scalar_value`` (a number or one-element array/tensor) under ``tag``."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        value = Summary.Value(tag=tag, simple_value=_as_scalar(tag, scalar_value))
        event = Event(wall_time=time.time() if walltime is None else walltime)
        event.summary.CopyFrom(Summary(value=[value]))
        if global_step is not None:
            event.step = global_step
        self.add_event(event)

    def flush(self) -> None:
        """Write every buffered event to the file."""
        with self._lock:
            if not self._closed:
                self._flush_locked()

    def close(self) -> None:
        """Flush and close the file; further writes raise ``ValueError``."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._writer.close()

    def _flush_locked(self) -> None:
        self._writer.flush()
        self._last_flush = time.monotonic()


class SummaryWriterCache:
    """One shared :class:`EventFileWriter` per log directory (TF's ``SummaryWriterCache``).

    Hooks writing to the same directory share one writer, so a directory gets one
    event file per process rather than one per hook. Cached writers are closed
    (flushed) at interpreter exit.

    Example:
        >>> import tempfile
        >>> logdir = tempfile.mkdtemp()
        >>> SummaryWriterCache.get(logdir) is SummaryWriterCache.get(logdir)
        True
        >>> SummaryWriterCache.clear()
    """

    _writers: dict[str, EventFileWriter] = {}
    _lock = threading.Lock()
    _close_at_exit = False

    @staticmethod
    def _key(logdir: str | os.PathLike[str]) -> str:
        logdir = os.fspath(logdir)
        # Remote URLs ("s3://...") are kept as given; local spellings of one
        # directory ("a/b", "./a/b/") share a writer.
        return logdir if "://" in logdir else os.path.abspath(logdir)

    @staticmethod
    def get(logdir: str | os.PathLike[str]) -> EventFileWriter:
        """Return the writer for ``logdir``, creating it (and the directory) on first use.

        Args:
          logdir: the directory the event file goes into.

        Returns:
          The directory's :class:`EventFileWriter`.
        """
        key = SummaryWriterCache._key(logdir)
        with SummaryWriterCache._lock:
            writer = SummaryWriterCache._writers.get(key)
            if writer is None:
                writer = EventFileWriter(key)
                SummaryWriterCache._writers[key] = writer
                if not SummaryWriterCache._close_at_exit:
                    atexit.register(SummaryWriterCache.clear)
                    SummaryWriterCache._close_at_exit = True
            return writer

    @staticmethod
    def clear() -> None:
        """Close (flush) every cached writer and forget them."""
        with SummaryWriterCache._lock:
            writers = list(SummaryWriterCache._writers.values())
            SummaryWriterCache._writers.clear()
        for writer in writers:
            writer.close()


def summary_writer_for(
    summary_writer: ScalarSummaryWriter | None, output_dir: str | os.PathLike[str] | None
) -> ScalarSummaryWriter | None:
    """The writer a hook uses: ``summary_writer`` if given, else ``output_dir``'s cached one.

    Hooks call this in ``begin``, so a hook reused after :meth:`SummaryWriterCache.clear`
    gets an open writer.
    """
    if summary_writer is not None:
        return summary_writer
    return SummaryWriterCache.get(output_dir) if output_dir else None


def _as_scalar(tag: str, value: Any) -> float:
    """``value`` (a Python number, NumPy/JAX scalar or one-element array, torch tensor) as a float.

    Raises:
      ValueError: naming ``tag`` if ``value`` is not a single number.
    """
    item = getattr(value, "item", None)
    if callable(item):
        try:
            value = item()
        except (ValueError, RuntimeError, TypeError):
            pass  # more than one element: reported below
    try:
        return float(value)
    except (TypeError, ValueError):
        shape = getattr(value, "shape", None)
        described = f"{type(value).__name__} of shape {tuple(shape)}" if shape else repr(value)
        raise ValueError(
            f"Summary {tag!r} must be a single number, got {described}. Reduce it to a "
            "scalar (e.g. loss.mean()) in the function that produces it."
        ) from None


def _write_session_start(writer: Any, step: int, wall_time: float) -> None:
    """Write ``SessionLog(START)`` at ``step`` if ``writer`` can write raw events.

    TensorBoard uses it to drop events a restarted job left at later steps.
    Writers that only offer ``add_scalar`` are skipped.
    """
    get_file_writer = getattr(writer, "_get_file_writer", None)  # tensorboardX.SummaryWriter
    file_writer = get_file_writer() if callable(get_file_writer) else writer
    add_event = getattr(file_writer, "add_event", None)
    if not callable(add_event):
        return
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    add_event(
        Event(step=step, wall_time=wall_time, session_log=SessionLog(status=SessionLog.START))
    )


def _check_summary_op(summary_op: Any, where: str) -> None:
    ok = isinstance(summary_op, str) or callable(summary_op)
    if isinstance(summary_op, (list, tuple)):
        ok = all(isinstance(op, str) or callable(op) for op in summary_op)
    elif isinstance(summary_op, Mapping):
        ok = all(isinstance(tag, str) for tag in summary_op) and all(
            isinstance(op, str) or callable(op) for op in summary_op.values()
        )
    if not ok:
        raise TypeError(
            f"{where} must be a fetch name (str), a list of names, a dict {{tag: name or "
            f"callable}}, or a callable returning {{tag: scalar}}; got {summary_op!r}."
        )


def _scalars(summary_op: Any, results: Any) -> dict[str, float]:
    """Pair each summary's tag with its value from the run's ``results``."""
    if isinstance(summary_op, Mapping):
        return {tag: _as_scalar(tag, results[tag]) for tag in summary_op}
    if not isinstance(summary_op, (list, tuple)):
        summary_op, results = [summary_op], [results]
    scalars: dict[str, float] = {}
    for op, value in zip(summary_op, results):
        if isinstance(op, str):
            scalars[op] = _as_scalar(op, value)
        elif isinstance(value, Mapping):
            scalars.update((str(tag), _as_scalar(str(tag), v)) for tag, v in value.items())
        else:
            name = getattr(op, "__name__", repr(op))
            raise TypeError(
                f"The summary_op callable {name} returned {type(value).__name__}; it must "
                "return a dict {tag: scalar}. To name a single value pass summary_op="
                f"{{'my_tag': {name}}} instead."
            )
    return scalars


class SummarySaverHook(SessionRunHook):
    """Writes scalar summaries every N steps or N seconds, and always on the first run.

    ``summary_op`` (or ``scaffold.summary_op``, read in ``begin``) says what to write:
    a fetch name (the tag is the name), a list of names, a dict ``{tag: name or
    callable}``, or a callable returning ``{tag: scalar}``. Callables are only called
    on the runs that write, and every value is written at the global step reached
    after the run. As in TF, whether a run writes is decided before it, as if it
    advanced the step by one. The first run also writes ``SessionLog(START)`` so that
    TensorBoard discards events a previous, crashed job wrote past this step. ``end``
    flushes.

    Args:
      save_steps: write every this many global steps.
      save_secs: write every this many seconds. Exactly one of the two is given.
      output_dir: directory for the event file (a shared writer from
        :class:`SummaryWriterCache`); used only without ``summary_writer``.
      summary_writer: any object with ``add_scalar(tag, value, global_step)`` and
        ``flush()``, e.g. ``tensorboardX.SummaryWriter``. With neither this nor
        ``output_dir`` the hook writes nothing.
      scaffold: a ``Scaffold`` whose ``summary_op`` is written.
      summary_op: what to write (see above).
      clock: the time source for ``save_secs``.

    Raises:
      ValueError: unless exactly one of ``scaffold`` and ``summary_op`` is given, or
        unless exactly one of ``save_steps`` and ``save_secs`` is given.

    Example:
        >>> import tempfile
        >>> from trainhooks.session.hooked import HookedSession
        >>> from trainhooks.session.session import Session
        >>> hook = SummarySaverHook(save_steps=100, output_dir=tempfile.mkdtemp(),
        ...                         summary_op=["loss"])
        >>> hook.begin()
        >>> sess = HookedSession(Session(), [hook])
        >>> sess.run(lambda: {"loss": 0.25})        # writes loss=0.25 at step 1
        {'loss': 0.25}
        >>> hook.end(sess.raw_session)
    """

    def __init__(
        self,
        save_steps: int | None = None,
        save_secs: float | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        summary_writer: ScalarSummaryWriter | None = None,
        scaffold: Any = None,
        summary_op: Any = None,
        *,
        clock: Clock = wall_clock,
    ) -> None:
        from trainhooks import _checks
        from trainhooks.session.creators import Scaffold

        _checks.positive_int("save_steps", save_steps, allow_zero=True)
        _checks.positive_number("save_secs", save_secs, allow_zero=True, unit="seconds")
        output_dir = _checks.directory_path("output_dir", output_dir, example="'logs'")
        _checks.summary_writer("summary_writer", summary_writer)
        _checks.instance_of(
            "scaffold", scaffold, Scaffold, example="Scaffold(summary_op={'loss': 'loss'})"
        )
        if (scaffold is None) == (summary_op is None):
            raise ValueError("Exactly one of scaffold or summary_op must be provided.")
        if summary_op is not None:
            _check_summary_op(summary_op, "summary_op")
        self._summary_op = summary_op
        self._writer_arg = summary_writer
        self._summary_writer: ScalarSummaryWriter | None = None
        self._output_dir = output_dir
        self._scaffold = scaffold
        self._clock = clock
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps, clock=clock)
        self._current_op: Any = None
        self._next_step: int | None = None
        self._request_summary = False

    def begin(self) -> None:
        """Open the summary writer and pick the summary op (given, else the scaffold's)."""
        self._summary_writer = summary_writer_for(self._writer_arg, self._output_dir)
        self._next_step = None
        self._current_op = self._summary_op
        if self._current_op is None:
            self._current_op = self._scaffold.summary_op
            if self._current_op is not None:
                _check_summary_op(self._current_op, "scaffold.summary_op")

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Fetch the summaries on the first run and whenever the timer triggers."""
        if self._summary_writer is None:
            return None  # nowhere to write: call nothing
        self._request_summary = self._next_step is None or self._timer.should_trigger_for_step(
            self._next_step
        )
        if self._request_summary and self._current_op is not None:
            return SessionRunArgs(self._current_op)
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Write the fetched summaries at the real global step (and a session start on the first run)."""
        writer = self._summary_writer
        if writer is None:
            return
        global_step = run_context.session.global_step
        if self._next_step is None:
            _write_session_start(writer, global_step, self._clock())
        if self._request_summary:
            self._timer.update_last_triggered_step(global_step)
            if run_values.results is not None:
                for tag, value in _scalars(self._current_op, run_values.results).items():
                    writer.add_scalar(tag, value, global_step)
        self._next_step = global_step + 1

    def end(self, session: Session | None = None) -> None:
        """Flush the summary writer."""
        if self._summary_writer is not None:
            self._summary_writer.flush()
