"""Hooks that look at the step's values: ``LoggingTensorHook`` and ``NanTensorHook``.

"Tensors" are fetch names or callables resolved by the session (see
:class:`~trainhooks.Session`): typically keys of the mapping the step function returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from trainhooks import errors
from trainhooks._clock import Clock, wall_clock
from trainhooks.hooks.timers import NeverTriggerTimer, SecondOrStepTimer
from trainhooks.session.run_hook import (
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)

if TYPE_CHECKING:
    from trainhooks.session.session import Session

__all__ = ["LoggingTensorHook", "NanLossDuringTrainingError", "NanTensorHook"]

logger = logging.getLogger(__name__)


class NanLossDuringTrainingError(errors.Error, RuntimeError):
    """Raised by :class:`NanTensorHook` when the loss is NaN; a ``RuntimeError``, as in TF."""

    def __init__(self, message: str = "NaN loss during training.") -> None:
        super().__init__(message)


def _is_nan(name: Any, value: Any) -> bool:
    if value is None:
        raise TypeError(
            f"NanTensorHook: the loss {name!r} is None in this run; the step must produce "
            "a number (or a tensor) under that name."
        )
    isnan = getattr(value, "isnan", None)  # torch tensors, on any device
    if callable(isnan) and not isinstance(value, np.ndarray):
        return bool(isnan().any())
    return bool(np.isnan(np.asarray(value, dtype=np.float64)).any())


class NanTensorHook(SessionRunHook):
    """Checks the loss after every run; on NaN raises, or requests a stop.

    Args:
      loss_tensor: the loss as a fetch name (e.g. ``"loss"``, a key of the mapping the
        step function returns) or a callable.
      fail_on_nan_loss: raise :class:`NanLossDuringTrainingError` (True) or log a
        warning and request a stop (False).

    Example:
        >>> hook = NanTensorHook("loss")  # a step returning {"loss": nan} raises
    """

    def __init__(self, loss_tensor: Any, fail_on_nan_loss: bool = True) -> None:
        from trainhooks import _checks

        if not (isinstance(loss_tensor, str) or callable(loss_tensor)):
            _checks.function(
                "loss_tensor",
                loss_tensor,
                what="a fetch name (str) or a function",
                example="'loss'",
            )
        _checks.boolean("fail_on_nan_loss", fail_on_nan_loss)
        self._loss_tensor = loss_tensor
        self._fail_on_nan_loss = fail_on_nan_loss

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Fetch the loss."""
        return SessionRunArgs(self._loss_tensor)

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """On a NaN loss, raise :class:`NanLossDuringTrainingError` or request a stop."""
        if _is_nan(self._loss_tensor, run_values.results):
            failure_message = "Model diverged with loss = NaN."
            if self._fail_on_nan_loss:
                logger.error(failure_message)
                raise NanLossDuringTrainingError
            logger.warning(failure_message)
            run_context.request_stop()


class LoggingTensorHook(SessionRunHook):
    """Logs tensors every N local iterations, every N seconds, and/or at the end.

    Values are logged at INFO as ``"tag = value, ..."`` (with ``" (%.3f sec)"`` since
    the previous log), or as ``formatter(values)``. The iteration count is this hook's
    own count of runs since ``begin``, not the global step.

    Args:
      tensors: a dict ``{tag: name or callable}`` (logged in sorted tag order), or an
        iterable of names (logged in the given order; the tag is the name).
      every_n_iter: log once every this many runs.
      every_n_secs: log once every this many seconds.
      at_end: also log in ``end``. Names a step function returns are logged with
        their value from the last run; callables are called again.
      formatter: ``formatter(dict tag -> value) -> str`` replacing the default format.
      clock: the time source.

    Raises:
      ValueError: unless ``at_end`` and/or exactly one of ``every_n_iter`` and
        ``every_n_secs`` is given, or if ``every_n_iter <= 0``.
      TypeError: if ``tensors`` is not a dict of names/callables or names.

    Example:
        >>> hook = LoggingTensorHook(["loss", "global_step"], every_n_iter=100)
    """

    def __init__(
        self,
        tensors: Mapping[str, Any] | Iterable[str] | str,
        every_n_iter: int | None = None,
        every_n_secs: float | None = None,
        at_end: bool = False,
        formatter: Callable[[dict[str, Any]], str] | None = None,
        *,
        clock: Clock = wall_clock,
    ) -> None:
        from trainhooks import _checks

        _checks.integer("every_n_iter", every_n_iter, example=100)
        _checks.positive_number("every_n_secs", every_n_secs, allow_zero=True, unit="seconds")
        _checks.boolean("at_end", at_end)
        _checks.function(
            "formatter", formatter, allow_none=True, example="lambda values: str(values)"
        )
        only_log_at_end = at_end and every_n_iter is None and every_n_secs is None
        if not only_log_at_end and (every_n_iter is None) == (every_n_secs is None):
            raise ValueError(
                "either at_end and/or exactly one of every_n_iter and every_n_secs "
                "must be provided."
            )
        if every_n_iter is not None and every_n_iter <= 0:
            raise ValueError(f"invalid every_n_iter={every_n_iter}.")
        if isinstance(tensors, str):
            tensors = [tensors]
        if isinstance(tensors, Mapping):
            self._tag_order = sorted(tensors)
            self._tensors = dict(tensors)
        else:
            self._tag_order = list(tensors)
            if not all(isinstance(t, str) for t in self._tag_order):
                raise TypeError(
                    f"LoggingTensorHook tensors given as a list must be fetch names (str), got "
                    f"{self._tag_order!r}; pass a dict {{tag: callable}} to log a callable."
                )
            self._tensors = {name: name for name in self._tag_order}
        self._names = {tag: t for tag, t in self._tensors.items() if isinstance(t, str)}
        self._formatter = formatter
        self._timer: SecondOrStepTimer = (
            NeverTriggerTimer()
            if only_log_at_end
            else SecondOrStepTimer(every_secs=every_n_secs, every_steps=every_n_iter, clock=clock)
        )
        self._log_at_end = at_end
        self._iter_count = 0
        self._should_trigger = False
        self._last_values: dict[str, Any] = {}

    def begin(self) -> None:
        """Reset the timer and the iteration count."""
        self._timer.reset()
        self._iter_count = 0
        self._last_values = {}

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Fetch the tensors when the timer triggers for this iteration (or to log them at the end)."""
        self._should_trigger = self._timer.should_trigger_for_step(self._iter_count)
        if self._should_trigger:
            return SessionRunArgs(self._tensors)
        if self._log_at_end and self._names:
            # Step outputs exist only during a run: keep the latest for ``end``.
            return SessionRunArgs(self._names)
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Log the fetched tensors when this iteration triggered; count the iteration."""
        if self._log_at_end and run_values.results is not None:
            self._last_values = {tag: run_values.results[tag] for tag in self._names}
        if self._should_trigger:
            self._log_tensors(run_values.results)
        self._iter_count += 1

    def end(self, session: Session) -> None:
        """With ``at_end``, log the tensors' latest values."""
        if not self._log_at_end:
            return
        fetches = {t: v for t, v in self._tensors.items() if t not in self._last_values}
        values = {**self._last_values, **session.run(fetches)}
        self._log_tensors(values)

    def _log_tensors(self, tensor_values: Mapping[str, Any]) -> None:
        elapsed_secs, _ = self._timer.update_last_triggered_step(self._iter_count)
        with np.printoptions(suppress=True):
            if self._formatter is not None:
                logger.info("%s", self._formatter(dict(tensor_values)))
                return
            stats = ", ".join(f"{tag} = {tensor_values[tag]}" for tag in self._tag_order)
        if elapsed_secs is not None:
            logger.info("%s (%.3f sec)", stats, elapsed_secs)
        else:
            logger.info("%s", stats)
