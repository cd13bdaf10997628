"""``ProfilerHook``: a Chrome trace (``timeline-<step>.json``) of one step every N steps or seconds.

With PyTorch installed the trace comes from ``torch.profiler`` (CPU, and CUDA when
available), with the run marked as a ``session.run`` span; torch is imported on the
first traced step only. Without PyTorch the trace holds the step's wall time as one
span, written with ``json``, so the hook also serves NumPy and JAX loops.
Open the files in ``chrome://tracing`` or https://ui.perfetto.dev.
"""

from __future__ import annotations

import json
import logging
import os
import threading
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

__all__ = ["ProfilerHook"]

logger = logging.getLogger(__name__)


class _StepTrace(Protocol):
    """A trace started before a step: ``save`` writes it, ``discard`` drops it."""

    def save(self, path: str, step: int) -> None: ...

    def discard(self) -> None: ...


_SPAN_NAME = "session.run"


class _TorchStepTrace:
    def __init__(self, show_memory: bool) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile, record_function

        activities = [ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(ProfilerActivity.CUDA)
        self._profile = profile(activities=activities, profile_memory=show_memory)
        self._profile.start()
        self._span = record_function(_SPAN_NAME)
        self._span.__enter__()

    def save(self, path: str, step: int) -> None:
        self.discard()
        self._profile.export_chrome_trace(path)

    def discard(self) -> None:
        self._span.__exit__(None, None, None)
        self._profile.stop()


class _WallTimeStepTrace:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._start = clock()

    def save(self, path: str, step: int) -> None:
        end = self._clock()
        event = {
            "name": _SPAN_NAME,
            "cat": "step",
            "ph": "X",  # a complete event: start and duration
            "ts": self._start * 1e6,  # Chrome traces count microseconds
            "dur": (end - self._start) * 1e6,
            "pid": os.getpid(),
            "tid": threading.get_ident(),
            "args": {"global_step": step},
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"traceEvents": [event], "displayTimeUnit": "ms"}, f)

    def discard(self) -> None:
        pass


def _start_step_trace(show_memory: bool, clock: Clock) -> _StepTrace:
    try:
        return _TorchStepTrace(show_memory)
    except ImportError:
        pass  # no PyTorch: the wall-time trace below
    except RuntimeError as e:  # e.g. another profiler is already running
        logger.warning("torch.profiler could not start (%s); tracing wall time only.", e)
    return _WallTimeStepTrace(clock)


class ProfilerHook(SessionRunHook):
    """Saves a Chrome trace of one step every ``save_steps`` steps or ``save_secs`` seconds.

    The first run never traces: it starts the timer. When the timer fires, the trace
    starts in ``before_run`` and is written in ``after_run`` to
    ``<output_dir>/timeline-<step>.json``, ``<step>`` being the global step the run
    reached. Its path is also put into the run's ``run_metadata`` under
    ``"step_<step>"`` (TF's run-metadata tag).

    Args:
      save_steps: trace every this many global steps.
      save_secs: trace every this many seconds. Exactly one of the two is given.
      output_dir: the directory for the traces (created if needed); the current
        directory by default.
      show_dataflow: accepted for compatibility with TF; torch traces always link
        CPU launches to GPU kernels.
      show_memory: record tensor allocations (``torch.profiler``'s ``profile_memory``).
      clock: the time source.

    Raises:
      ValueError: unless exactly one of ``save_steps`` and ``save_secs`` is given.

    Example:
        >>> import tempfile
        >>> from trainhooks.session.hooked import HookedSession
        >>> from trainhooks.session.session import Session
        >>> hook = ProfilerHook(save_steps=1, output_dir=tempfile.mkdtemp())
        >>> hook.begin()
        >>> sess, metadata = HookedSession(Session(), [hook]), {}
        >>> for _ in range(2):
        ...     sess.run(lambda: None, run_metadata=metadata)
        >>> sorted(metadata)                 # the first run does not trace
        ['step_2']
    """

    def __init__(
        self,
        save_steps: int | None = None,
        save_secs: float | None = None,
        output_dir: str | os.PathLike[str] = "",
        show_dataflow: bool = True,
        show_memory: bool = False,
        *,
        clock: Clock = wall_clock,
    ) -> None:
        from trainhooks import _checks

        _checks.positive_int("save_steps", save_steps, allow_zero=True)
        _checks.positive_number("save_secs", save_secs, allow_zero=True, unit="seconds")
        output_dir = _checks.directory_path(
            "output_dir", output_dir, allow_none=False, example="'traces'"
        )
        _checks.boolean("show_dataflow", show_dataflow)
        _checks.boolean("show_memory", show_memory)
        self._output_dir = os.fspath(output_dir)
        self._show_dataflow = show_dataflow
        self._show_memory = show_memory
        self._clock = clock
        self._timer = SecondOrStepTimer(every_secs=save_secs, every_steps=save_steps, clock=clock)
        self._next_step: int | None = None
        self._trace: _StepTrace | None = None

    def begin(self) -> None:
        """Reset the schedule and create ``output_dir``."""
        self._next_step = None
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)

    def after_create_session(self, session: Session, coord: Any) -> None:
        """Drop a trace left by a run that failed before a recovery."""
        self._discard_trace()  # a trace left by a run that failed before recovery

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Start tracing this step when the timer triggers (the first run only starts the timer)."""
        self._discard_trace()
        if self._next_step is None:
            # The first run only starts the timer, from the step before the run, so
            # the first trace comes N steps or seconds later.
            self._timer.update_last_triggered_step(run_context.session.global_step)
        elif self._timer.should_trigger_for_step(self._next_step):
            self._trace = _start_step_trace(self._show_memory, self._clock)
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Save the step's trace as ``timeline-<step>.json`` in ``output_dir``."""
        global_step = run_context.session.global_step
        trace, self._trace = self._trace, None
        if trace is not None:
            self._timer.update_last_triggered_step(global_step)
            path = os.path.join(self._output_dir, f"timeline-{global_step}.json")
            logger.info("Saving timeline for %d into '%s'.", global_step, path)
            trace.save(path, global_step)
            run_values.run_metadata[f"step_{global_step}"] = path
        self._next_step = global_step + 1

    def end(self, session: Session) -> None:
        """Drop an unfinished trace."""
        self._discard_trace()

    def _discard_trace(self) -> None:
        trace, self._trace = self._trace, None
        if trace is not None:
            trace.discard()
