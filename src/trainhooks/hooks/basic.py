"""The standard hooks of ``tf.train``: stopping, step rate, logging, NaN checks, feeds.

Each hook reads the global step the run reached from ``run_context.session.global_step``
after the run (TF 2.x behaviour); "tensors" are fetch names or callables, resolved by
the session (see :class:`~trainhooks.Session`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from trainhooks import errors
from trainhooks._clock import Clock, wall_clock
from trainhooks.hooks.summary import ScalarSummaryWriter, summary_writer_for
from trainhooks.hooks.timers import SecondOrStepTimer
from trainhooks.session.run_hook import (
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

if TYPE_CHECKING:
    from trainhooks.session.coordinator import Coordinator
    from trainhooks.session.session import Session

__all__ = [
    "FeedFnHook",
    "FinalOpsHook",
    "GlobalStepWaiterHook",
    "StepCounterHook",
    "StopAtStepHook",
]

logger = logging.getLogger(__name__)


class StopAtStepHook(SessionRunHook):
    """Requests a stop after the run that brings the global step to ``last_step``.

    With ``num_steps``, the last step is computed once, in the first
    ``after_create_session``, as the session's global step plus ``num_steps``; a
    recovered session keeps it.

    Args:
      num_steps: the number of steps to run from the step the session starts at.
      last_step: the step after which to stop. Exactly one of the two is given.

    Raises:
      ValueError: if neither or both of ``num_steps`` and ``last_step`` are given.

    Example:
        >>> hook = StopAtStepHook(last_step=1000)  # the run reaching step 1000 is the last
    """

    def __init__(self, num_steps: int | None = None, last_step: int | None = None) -> None:
        from trainhooks import _checks

        _checks.positive_int("num_steps", num_steps, allow_zero=True, example=1000)
        _checks.non_negative_int("last_step", last_step, example=1000)
        if num_steps is None and last_step is None:
            raise ValueError("One of num_steps or last_step must be specified.")
        if num_steps is not None and last_step is not None:
            raise ValueError("Only one of num_steps or last_step can be specified.")
        self._num_steps = num_steps
        self._last_step = last_step

    @property
    def last_step(self) -> int | None:
        """The step after which training stops (None until known with ``num_steps``)."""
        return self._last_step

    def after_create_session(self, session: Session, coord: Coordinator | None) -> None:
        """With ``num_steps``, fix ``last_step`` from the session's step (once, not after a
        recovery); a session that starts at or past ``last_step`` stops before any step.

        A finished job that is launched again (a scheduler's requeue after success)
        restores its last step and so runs nothing. TensorFlow's hook only looks after a
        run, so TensorFlow trains one more step there.
        """
        if self._last_step is None:
            assert self._num_steps is not None
            self._last_step = session.global_step + self._num_steps
        if coord is not None and session.global_step >= self._last_step:
            logger.info(
                "Global step %d has already reached last_step %d: stopping before any step.",
                session.global_step,
                self._last_step,
            )
            coord.request_stop()

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Request a stop once the real global step reaches ``last_step``."""
        if self._last_step is None:
            raise RuntimeError(
                "StopAtStepHook(num_steps=...) learns its start step in after_create_session; "
                "use it in a MonitoredSession, or pass last_step= instead."
            )
        if run_context.session.global_step >= self._last_step:
            run_context.request_stop()


class StepCounterHook(SessionRunHook):
    """Measures training speed in global steps per second, every N steps or N seconds.

    Logs ``"global_step/sec: <rate>"`` and, with a writer, writes the scalar summary
    ``global_step/sec`` at the step reached. The first trigger only starts the clock.
    Warns (the first 5 times) when a run left the global step unchanged.

    Args:
      every_n_steps: measure every this many global steps.
      every_n_secs: measure every this many seconds. Exactly one of the two is given
        (pass ``every_n_steps=None`` with ``every_n_secs``).
      output_dir: directory for an event file (a shared writer from
        ``SummaryWriterCache``), used only without ``summary_writer``.
      summary_writer: any object with ``add_scalar(tag, value, global_step)`` and
        ``flush()``, e.g. ``tensorboardX.SummaryWriter``.
      clock: the time source.

    Raises:
      ValueError: unless exactly one of ``every_n_steps`` and ``every_n_secs`` is given.

    Example:
        >>> hook = StepCounterHook(every_n_steps=100, output_dir="logs")
    """

    _WARN_FIRST_N = 5

    def __init__(
        self,
        every_n_steps: int | None = 100,
        every_n_secs: float | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        summary_writer: ScalarSummaryWriter | None = None,
        *,
        clock: Clock = wall_clock,
    ) -> None:
        from trainhooks import _checks

        _checks.positive_int("every_n_steps", every_n_steps, allow_zero=True)
        _checks.positive_number("every_n_secs", every_n_secs, allow_zero=True, unit="seconds")
        output_dir = _checks.directory_path("output_dir", output_dir, example="'logs'")
        _checks.summary_writer("summary_writer", summary_writer)
        if (every_n_steps is None) == (every_n_secs is None):
            raise ValueError("exactly one of every_n_steps and every_n_secs should be provided.")
        self._timer = SecondOrStepTimer(
            every_steps=every_n_steps, every_secs=every_n_secs, clock=clock
        )
        self._writer_arg = summary_writer
        self._summary_writer: ScalarSummaryWriter | None = None
        self._output_dir = output_dir
        self._summary_tag = "global_step/sec"
        self._step_before_run = 0
        self._warnings_logged = 0

    def begin(self) -> None:
        """Open the summary writer (``summary_writer``, else the cached one for ``output_dir``)."""
        self._summary_writer = summary_writer_for(self._writer_arg, self._output_dir)

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Remember the global step before the run, to warn when it does not advance."""
        self._step_before_run = run_context.session.global_step
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """On a trigger, log and record steps per second; warn when the step did not advance."""
        global_step = run_context.session.global_step
        if self._timer.should_trigger_for_step(global_step):
            elapsed_time, elapsed_steps = self._timer.update_last_triggered_step(global_step)
            if elapsed_time is not None and elapsed_steps is not None:
                self._log_and_record(elapsed_steps, elapsed_time, global_step)
        if global_step == self._step_before_run and self._warnings_logged < self._WARN_FIRST_N:
            # Some training loops leave the step alone on purpose (e.g. accumulation
            # steps), so this only warns a few times.
            self._warnings_logged += 1
            logger.warning(
                "It seems that global step has not been increased. Current value (could be "
                "stable): %s vs previous value: %s. You could increase the global step by "
                "leaving the session's advance_global_step=True or by setting "
                "session.global_step in your step function.",
                global_step,
                self._step_before_run,
            )

    def end(self, session: Session) -> None:
        """Flush the summary writer."""
        if self._summary_writer is not None:
            self._summary_writer.flush()

    def _log_and_record(self, elapsed_steps: int, elapsed_time: float, global_step: int) -> None:
        if elapsed_time <= 0:
            return  # the clock did not move: there is no rate to report
        steps_per_sec = elapsed_steps / elapsed_time
        if self._summary_writer is not None:
            self._summary_writer.add_scalar(self._summary_tag, steps_per_sec, global_step)
        logger.info("%s: %g", self._summary_tag, steps_per_sec)


class GlobalStepWaiterHook(SessionRunHook):
    """Delays the first run until the global step reaches ``wait_until_step``.

    Used to start workers gradually, e.g. ``wait_until_step=int(K * log(task_id + 1))``.
    The step is polled every 0.5 s; it waits only before the first run.

    Args:
      wait_until_step: the global step to wait for; ``<= 0`` means no wait.
      clock: the time source (for the time waited, which is logged).
      sleep: the function that waits between polls (``time.sleep``).

    Example:
        >>> hook = GlobalStepWaiterHook(wait_until_step=0)
    """

    _POLL_SECS = 0.5

    def __init__(
        self,
        wait_until_step: int,
        *,
        clock: Clock = wall_clock,
        sleep: Callable[[float], Any] = time.sleep,
    ) -> None:
        from trainhooks import _checks

        _checks.integer("wait_until_step", wait_until_step, allow_none=False, example=1000)
        _checks.function("clock", clock, example="time.time")
        _checks.function("sleep", sleep, example="time.sleep")
        self._wait_until_step = wait_until_step
        self._clock = clock
        self._sleep = sleep
        self._worker_is_started = False

    def begin(self) -> None:
        """Forget any earlier wait: the next ``before_run`` waits again."""
        self._worker_is_started = False

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Block until the global step reaches ``wait_until_step`` (once)."""
        if self._worker_is_started:
            return None
        if self._wait_until_step <= 0:
            self._worker_is_started = True
            return None
        session = run_context.session
        if (
            getattr(session, "advance_global_step", False)
            and session.global_step < self._wait_until_step
            and _in_a_job()
        ):
            # Every process of a job trains in lockstep and advances its own step with
            # its own runs: the step this hook waits for can only come from the runs it
            # holds back, and the other processes wait in their next collective.
            raise errors.InvalidArgumentError(
                f"GlobalStepWaiterHook(wait_until_step={self._wait_until_step}) would wait "
                f"forever: in a torch.distributed job every process is at the same global "
                f"step ({session.global_step}), which advances only with its own runs. "
                "Drop the hook in a synchronous job, or create the session with "
                "advance_global_step=False and set the step from information the processes "
                "share."
            )
        logger.info("Waiting for global step %d before starting training.", self._wait_until_step)
        start = self._clock()
        last_logged_step = 0
        while True:
            current_step = run_context.session.global_step
            if current_step >= self._wait_until_step:
                self._worker_is_started = True
                logger.info(
                    "Global step %d reached after waiting %.1f secs.",
                    current_step,
                    self._clock() - start,
                )
                return None
            if current_step - last_logged_step > 1000:
                logger.info(
                    "Waiting for global step %d before starting training. Current step is %d.",
                    self._wait_until_step,
                    current_step,
                )
                last_logged_step = current_step
            self._sleep(self._POLL_SECS)


class FinalOpsHook(SessionRunHook):
    """Evaluates ``final_ops`` when the session ends; read them from ``final_ops_values``.

    Args:
      final_ops: a fetch name, a callable, or a list/dict nesting them.
      final_ops_feed_dict: feeds passed to the callables as keyword arguments.

    Example:
        >>> from trainhooks.session.session import Session
        >>> hook = FinalOpsHook({"w": "w", "double": lambda: 2 * 21})
        >>> hook.end(Session({"w": 1.5}))
        >>> hook.final_ops_values
        {'w': 1.5, 'double': 42}
    """

    def __init__(
        self, final_ops: Any, final_ops_feed_dict: Mapping[str, Any] | None = None
    ) -> None:
        from trainhooks import _checks

        _checks.mapping("final_ops_feed_dict", final_ops_feed_dict, example="{'batch': batch}")
        self._final_ops = final_ops
        self._final_ops_feed_dict = final_ops_feed_dict
        self._final_ops_values: Any = None

    @property
    def final_ops_values(self) -> Any:
        """The values of ``final_ops`` at the end of the session; None before ``end``."""
        return self._final_ops_values

    def end(self, session: Session) -> None:
        """Run ``final_ops`` with their feed and keep the values in ``final_ops_values``."""
        if self._final_ops is None:
            return
        try:
            self._final_ops_values = session.run(
                self._final_ops, feed_dict=self._final_ops_feed_dict
            )
        except (errors.OutOfRangeError, StopIteration):
            logger.warning(
                "An OutOfRangeError or StopIteration exception is raised by the code in "
                "FinalOpsHook. This typically means the ops run by the FinalOpsHook have a "
                "dependency back to some input source, which should not happen. For example, "
                "a metric's final value should only read the accumulated state, not read "
                "another batch from the input, which is exhausted by then. Please fix that."
            )
            raise


class FeedFnHook(SessionRunHook):
    """Feeds every run with ``feed_fn()``: its dict becomes keyword arguments of the run's callables.

    Args:
      feed_fn: a function of no arguments returning a dict ``{name: value}``.

    Example:
        >>> batches = iter(range(100))
        >>> hook = FeedFnHook(lambda: {"batch": next(batches)})  # calls step(batch=...)
    """

    def __init__(self, feed_fn: Callable[[], Mapping[str, Any]]) -> None:
        from trainhooks import _checks

        _checks.function("feed_fn", feed_fn, example="lambda: {'batch': next(batches)}")
        self.feed_fn = feed_fn

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Feed ``feed_fn()`` into the run."""
        return SessionRunArgs(fetches=None, feed_dict=dict(self.feed_fn()))


def _in_a_job() -> bool:
    """True in a torch.distributed job of more than one process (torch already imported)."""
    dist = sys.modules.get("torch.distributed")
    return bool(
        dist is not None
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    )
