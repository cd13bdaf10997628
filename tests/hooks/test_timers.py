"""SecondOrStepTimer and NeverTriggerTimer (TF's SecondOrStepTimerTest, with a fake clock)."""

from __future__ import annotations

import pytest

from trainhooks.hooks.timers import NeverTriggerTimer, SecondOrStepTimer


def test_raise_in_both_secs_and_steps() -> None:
    with pytest.raises(ValueError, match="Can not provide both every_secs and every_steps"):
        SecondOrStepTimer(every_secs=2.0, every_steps=10)


def test_raise_in_none_secs_and_steps() -> None:
    with pytest.raises(ValueError, match="Either every_secs or every_steps should be provided"):
        SecondOrStepTimer()


def test_every_secs(clock) -> None:
    timer = SecondOrStepTimer(every_secs=1.0, clock=clock)
    assert timer.should_trigger_for_step(1)

    timer.update_last_triggered_step(1)
    assert not timer.should_trigger_for_step(1)
    assert not timer.should_trigger_for_step(2)

    clock.advance(1.0)
    assert not timer.should_trigger_for_step(1)  # the same step never triggers twice
    assert timer.should_trigger_for_step(2)  # the bound is inclusive


def test_every_steps() -> None:
    timer = SecondOrStepTimer(every_steps=3)
    assert timer.should_trigger_for_step(1)

    timer.update_last_triggered_step(1)
    assert not timer.should_trigger_for_step(1)
    assert not timer.should_trigger_for_step(2)
    assert not timer.should_trigger_for_step(3)
    assert timer.should_trigger_for_step(4)


def test_lower_step_does_not_trigger_in_steps_mode() -> None:
    timer = SecondOrStepTimer(every_steps=3)
    timer.update_last_triggered_step(10)
    assert not timer.should_trigger_for_step(2)


def test_update_last_triggered_step(clock) -> None:
    timer = SecondOrStepTimer(every_steps=1, clock=clock)

    assert timer.update_last_triggered_step(1) == (None, None)
    assert timer.last_triggered_step() == 1

    clock.advance(0.5)
    elapsed_secs, elapsed_steps = timer.update_last_triggered_step(5)
    assert elapsed_secs == pytest.approx(0.5)
    assert elapsed_steps == 4

    clock.advance(0.25)
    elapsed_secs, elapsed_steps = timer.update_last_triggered_step(7)
    assert elapsed_secs == pytest.approx(0.25)
    assert elapsed_steps == 2


def test_reset_makes_the_next_call_trigger() -> None:
    timer = SecondOrStepTimer(every_steps=100)
    timer.update_last_triggered_step(1)
    assert not timer.should_trigger_for_step(2)
    timer.reset()
    assert timer.last_triggered_step() is None
    assert timer.should_trigger_for_step(2)
    assert timer.update_last_triggered_step(2) == (None, None)


def test_never_trigger_timer() -> None:
    timer = NeverTriggerTimer()
    assert not timer.should_trigger_for_step(0)
    assert timer.update_last_triggered_step(5) == (None, None)
    assert timer.last_triggered_step() is None
    assert not timer.should_trigger_for_step(1_000_000)
