"""When to act: ``SecondOrStepTimer`` (every N seconds or N steps) and ``NeverTriggerTimer``."""

from __future__ import annotations

from trainhooks._clock import Clock, wall_clock

__all__ = ["NeverTriggerTimer", "SecondOrStepTimer"]


class SecondOrStepTimer:
    """Triggers at most once every ``every_secs`` seconds or every ``every_steps`` steps.

    The first call of :meth:`should_trigger_for_step` always triggers; a step equal to
    the last triggered one never does. Both bounds are inclusive.

    Args:
      every_secs: trigger when at least this many seconds passed since the last trigger.
      every_steps: trigger when at least this many steps passed since the last trigger.
      clock: the time source, ``time.time`` by default (tests pass a fake clock).

    Raises:
      ValueError: if neither or both of ``every_secs`` and ``every_steps`` are given.

    Example:
        >>> timer = SecondOrStepTimer(every_steps=3)
        >>> timer.should_trigger_for_step(1)
        True
        >>> timer.update_last_triggered_step(1)
        (None, None)
        >>> [timer.should_trigger_for_step(s) for s in (2, 3, 4)]
        [False, False, True]
    """

    def __init__(
        self,
        every_secs: float | None = None,
        every_steps: int | None = None,
        *,
        clock: Clock = wall_clock,
    ) -> None:
        from trainhooks import _checks

        _checks.positive_number("every_secs", every_secs, allow_zero=True, unit="seconds")
        _checks.positive_int("every_steps", every_steps, allow_zero=True)
        _checks.function("clock", clock, example="time.time")
        if every_secs is None and every_steps is None:
            raise ValueError("Either every_secs or every_steps should be provided.")
        if every_secs is not None and every_steps is not None:
            raise ValueError("Can not provide both every_secs and every_steps.")
        self._every_secs = every_secs
        self._every_steps = every_steps
        self._clock = clock
        self._last_triggered_step: int | None = None
        self._last_triggered_time: float | None = None

    @property
    def every_secs(self) -> float | None:
        """The seconds between triggers, or None for a timer counting steps."""
        return self._every_secs

    def reset(self) -> None:
        """Forget the last trigger: the next :meth:`should_trigger_for_step` triggers."""
        self._last_triggered_step = None
        self._last_triggered_time = None

    def should_trigger_for_step(self, step: int) -> bool:
        """True if the timer should trigger for ``step``."""
        if self._last_triggered_step is None:
            return True
        if self._last_triggered_step == step:
            return False
        if self._every_secs is not None:
            assert self._last_triggered_time is not None
            if self._clock() >= self._last_triggered_time + self._every_secs:
                return True
        return (
            self._every_steps is not None and step >= self._last_triggered_step + self._every_steps
        )

    def update_last_triggered_step(self, step: int) -> tuple[float | None, int | None]:
        """Record a trigger at ``step``; returns (elapsed seconds, elapsed steps) or (None, None)."""
        current_time = self._clock()
        if self._last_triggered_time is None:
            elapsed_secs: float | None = None
            elapsed_steps: int | None = None
        else:
            assert self._last_triggered_step is not None
            elapsed_secs = current_time - self._last_triggered_time
            elapsed_steps = step - self._last_triggered_step
        self._last_triggered_time = current_time
        self._last_triggered_step = step
        return elapsed_secs, elapsed_steps

    def last_triggered_step(self) -> int | None:
        """The step of the last trigger, or None if it never triggered."""
        return self._last_triggered_step


class NeverTriggerTimer(SecondOrStepTimer):
    """A timer that never triggers."""

    def __init__(self) -> None:
        super().__init__(every_steps=1)

    def should_trigger_for_step(self, step: int) -> bool:
        """Never triggers: always False."""
        return False

    def update_last_triggered_step(self, step: int) -> tuple[float | None, int | None]:
        """Records nothing; returns ``(None, None)``."""
        return None, None

    def last_triggered_step(self) -> int | None:
        """Always None."""
        return None
