"""``EvaluationListener``: evaluate new checkpoints, and stop training on a result."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from trainhooks.hooks.listeners.hook_bound import HookBoundListener
from trainhooks.hooks.timers import SecondOrStepTimer
from trainhooks.session.session import Session

__all__ = ["Evaluation", "EvaluationListener"]


class Evaluation(NamedTuple):
    """One result of :class:`EvaluationListener`: the step, the checkpoint, what ``eval_fn`` returned."""

    global_step: int
    checkpoint_path: str
    result: Any


class EvaluationListener(HookBoundListener):
    """Runs ``eval_fn(checkpoint_prefix, global_step)`` on new checkpoints; may stop training.

    Without ``every_n_steps`` it evaluates every checkpoint whose step it has not
    evaluated yet (the save at session creation included; the re-save of the same
    step after a recovery is skipped). With ``every_n_steps=N`` it evaluates the first
    checkpoint, then the first one at least N steps after the last one evaluated, and in
    ``end`` the final checkpoint if that step was not evaluated yet (never twice).

    Every result is kept in :attr:`results`. When ``stop_if(result)`` is truthy,
    ``after_save`` returns True and the hook requests a stop after the current step.

    Args:
      eval_fn: ``eval_fn(checkpoint_prefix, global_step) -> result``; the prefix is a
        complete checkpoint (e.g. ``Saver().restore(eval_session, prefix)``).
      every_n_steps: evaluate at most once every this many steps (a positive int).
      stop_if: ``stop_if(result) -> bool``; truthy stops training.

    Example:
        >>> import trainhooks as th
        >>> evaluator = th.EvaluationListener(
        ...     lambda prefix, step: {"loss": evaluate(prefix)},
        ...     every_n_steps=1000, stop_if=lambda r: r["loss"] < 0.01)
        >>> hook = th.CheckpointSaverHook("/tmp/ckpt", save_steps=100, listeners=[evaluator])
    """

    def __init__(
        self,
        eval_fn: Callable[[str, int], Any],
        *,
        every_n_steps: int | None = None,
        stop_if: Callable[[Any], Any] | None = None,
    ) -> None:
        from trainhooks import _checks

        _checks.function(
            "eval_fn", eval_fn, example="lambda prefix, step: {'loss': evaluate(prefix)}"
        )
        _checks.function(
            "stop_if", stop_if, allow_none=True, example="lambda result: result['loss'] < 0.01"
        )
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"every_n_steps must be a positive int or None (every checkpoint), got {every_n_steps!r}."
            )
        self.eval_fn = eval_fn
        self.stop_if = stop_if
        self.results: list[Evaluation] = []
        self._timer = SecondOrStepTimer(every_steps=every_n_steps if every_n_steps else 0)

    def after_save(self, session: Session, global_step_value: int) -> bool:
        """Evaluate when the timer triggers for this step; True (stop training) if ``stop_if`` says so."""
        if not self._timer.should_trigger_for_step(global_step_value):
            return False
        result = self._evaluate(global_step_value)
        return bool(self.stop_if is not None and self.stop_if(result))

    def end(self, session: Session, global_step_value: int) -> None:
        """Evaluate the final checkpoint unless ``after_save`` already did."""
        # The hook guarantees a checkpoint at the final step by now.
        if self._timer.last_triggered_step() != global_step_value:
            self._evaluate(global_step_value)

    def _evaluate(self, step: int) -> Any:
        path = self._committed_checkpoint(step)
        self._timer.update_last_triggered_step(step)
        result = self.eval_fn(path, step)
        self.results.append(Evaluation(step, path, result))
        return result
