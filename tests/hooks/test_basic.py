"""The standard hooks of hooks/basic.py, ported from TF's basic_session_run_hooks_test.

As in TF, each hook is driven by a raw ``Session`` wrapped in ``HookedSession([hook])``;
``advance_global_step=False`` plus setting ``global_step`` emulates assigning the step.
Summaries are real event files read back with TensorBoard's own EventAccumulator.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX import SummaryWriter
from tests.helpers.hooks import hooked, log_messages

import trainhooks as th
from trainhooks.errors import OutOfRangeError
from trainhooks.hooks.basic import (
    FeedFnHook,
    FinalOpsHook,
    GlobalStepWaiterHook,
    StepCounterHook,
    StopAtStepHook,
)
from trainhooks.hooks.tensors import NanLossDuringTrainingError
from trainhooks.session.hooked import HookedSession
from trainhooks.session.run_hook import SessionRunContext
from trainhooks.session.session import Session

BASIC = "trainhooks.hooks.basic"


def read_scalars(logdir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {event.step: event.value for event in acc.Scalars(tag)}


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return log_messages(caplog, BASIC, level)


def test_public_names_resolve_to_this_module() -> None:
    assert th.StopAtStepHook is StopAtStepHook
    assert th.NanLossDuringTrainingError is NanLossDuringTrainingError
    assert th.FeedFnHook is FeedFnHook


# --- StopAtStepHook ---------------------------------------------------------------------------


def test_stop_at_step_raise_in_both_last_step_and_num_steps() -> None:
    with pytest.raises(ValueError, match="Only one of num_steps or last_step can be specified"):
        StopAtStepHook(num_steps=10, last_step=20)


def test_stop_at_step_raise_in_neither() -> None:
    with pytest.raises(ValueError, match="One of num_steps or last_step must be specified"):
        StopAtStepHook()


def test_stop_based_on_last_step() -> None:
    h = StopAtStepHook(last_step=10)
    h.begin()
    raw, mon_sess = hooked(h, advance=False)
    raw.global_step = 5
    h.after_create_session(raw, None)
    mon_sess.run(lambda: None)
    assert not mon_sess.should_stop()
    raw.global_step = 9
    mon_sess.run(lambda: None)
    assert not mon_sess.should_stop()
    raw.global_step = 10
    mon_sess.run(lambda: None)
    assert mon_sess.should_stop()
    raw.global_step = 11
    mon_sess = HookedSession(raw, [h])  # a fresh stop flag
    mon_sess.run(lambda: None)
    assert mon_sess.should_stop()


def test_stop_based_on_num_step() -> None:
    h = StopAtStepHook(num_steps=10)
    h.begin()
    raw, mon_sess = hooked(h, advance=False)
    raw.global_step = 5
    h.after_create_session(raw, None)
    assert h.last_step == 15
    for step, stops in [(5, False), (13, False), (14, False), (15, True)]:
        raw.global_step = step
        mon_sess.run(lambda: None)
        assert mon_sess.should_stop() is stops, step
    raw.global_step = 16
    mon_sess = HookedSession(raw, [h])
    mon_sess.run(lambda: None)
    assert mon_sess.should_stop()


def test_stop_based_with_multiple_steps() -> None:
    h = StopAtStepHook(num_steps=10)
    h.begin()
    raw, mon_sess = hooked(h, advance=False)
    raw.global_step = 5
    h.after_create_session(raw, None)
    mon_sess.run(lambda: None)
    assert not mon_sess.should_stop()
    raw.global_step = 15
    mon_sess.run(lambda: None)
    assert mon_sess.should_stop()


def test_stop_at_step_counts_real_steps_and_keeps_last_step_on_recreation() -> None:
    h = StopAtStepHook(num_steps=3)
    h.begin()
    raw, mon_sess = hooked(h, step=7)
    h.after_create_session(raw, None)
    steps = []
    while not mon_sess.should_stop():
        mon_sess.run(lambda: None)
        steps.append(raw.global_step)
    assert steps == [8, 9, 10]
    # A recovered session (restored at an earlier step) does not move the goal.
    h.after_create_session(Session(global_step=9), None)
    assert h.last_step == 10


def test_stop_at_num_steps_without_after_create_session_says_what_to_do() -> None:
    h = StopAtStepHook(num_steps=3)
    _, mon_sess = hooked(h)
    with pytest.raises(RuntimeError, match=r"after_create_session.*last_step="):
        mon_sess.run(lambda: None)


# --- StepCounterHook --------------------------------------------------------------------------


def test_step_counter_ctor_needs_exactly_one_of_steps_and_secs() -> None:
    with pytest.raises(ValueError, match="exactly one of every_n_steps and every_n_secs"):
        StepCounterHook(every_n_steps=None, every_n_secs=None)
    with pytest.raises(ValueError, match="exactly one of every_n_steps and every_n_secs"):
        StepCounterHook(every_n_steps=10, every_n_secs=1.0)


def test_step_counter_every_n_steps(tmp_path: Path, clock, caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    writer = SummaryWriter(str(tmp_path))
    hook = StepCounterHook(summary_writer=writer, every_n_steps=10, clock=clock)
    hook.begin()
    raw, mon_sess = hooked(hook)
    for _ in range(30):
        clock.advance(0.01)
        mon_sess.run(lambda: None)
    hook.end(raw)
    writer.close()

    assert messages(caplog, logging.WARNING) == []
    rates = read_scalars(tmp_path, "global_step/sec")
    assert sorted(rates) == [11, 21]
    assert all(rate == pytest.approx(100.0) for rate in rates.values())  # 10 steps / 0.1 s
    assert messages(caplog) == ["global_step/sec: 100", "global_step/sec: 100"]


def test_step_counter_every_n_secs(tmp_path: Path, clock) -> None:
    writer = SummaryWriter(str(tmp_path))
    hook = StepCounterHook(summary_writer=writer, every_n_steps=None, every_n_secs=0.1, clock=clock)
    hook.begin()
    raw, mon_sess = hooked(hook)
    mon_sess.run(lambda: None)
    clock.advance(0.2)
    mon_sess.run(lambda: None)
    clock.advance(0.2)
    mon_sess.run(lambda: None)
    hook.end(raw)
    writer.close()

    rates = read_scalars(tmp_path, "global_step/sec")
    assert sorted(rates) == [2, 3]
    assert all(rate == pytest.approx(5.0) for rate in rates.values())  # 1 step / 0.2 s


def test_step_counter_every_step_tag(tmp_path: Path, clock) -> None:
    # TF's test_global_step_name: two runs, one rate, tagged after the global step.
    writer = SummaryWriter(str(tmp_path))
    hook = StepCounterHook(summary_writer=writer, every_n_steps=1, every_n_secs=None, clock=clock)
    hook.begin()
    raw, mon_sess = hooked(hook)
    for _ in range(2):
        clock.advance(0.5)
        mon_sess.run(lambda: None)
    hook.end(raw)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["scalars"] == ["global_step/sec"]
    assert read_scalars(tmp_path, "global_step/sec") == {2: pytest.approx(2.0)}


def test_step_counter_output_dir_uses_the_cached_writer(tmp_path: Path, clock) -> None:
    hook = StepCounterHook(every_n_steps=2, output_dir=tmp_path / "logs", clock=clock)
    hook.begin()
    raw, mon_sess = hooked(hook)
    for _ in range(5):
        clock.advance(0.25)
        mon_sess.run(lambda: None)
    hook.end(raw)  # flushes: the rates are on disk without closing the writer
    assert read_scalars(tmp_path / "logs", "global_step/sec") == {
        3: pytest.approx(4.0),
        5: pytest.approx(4.0),
    }


def test_step_counter_without_writer_only_logs(clock, caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = StepCounterHook(every_n_steps=1, clock=clock)
    hook.begin()
    _, mon_sess = hooked(hook)
    for _ in range(3):
        clock.advance(0.5)
        mon_sess.run(lambda: None)
    assert messages(caplog) == ["global_step/sec: 2", "global_step/sec: 2"]


def test_log_warning_if_global_step_not_increased(clock, caplog) -> None:
    hook = StepCounterHook(every_n_steps=1, every_n_secs=None, clock=clock)
    hook.begin()
    raw, mon_sess = hooked(hook, advance=False)
    mon_sess.run(lambda: None)
    for _ in range(30):
        clock.advance(0.1)
        mon_sess.run(lambda: None)
    hook.end(raw)
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 5  # only the first 5 times
    assert all(re.search("global step.*has not been increased", w) for w in warnings)
    assert "Current value (could be stable): 0 vs previous value: 0" in warnings[0]


@pytest.mark.parametrize(
    ("every_n_steps", "steps_per_run", "expected_steps"),
    [(10, 5, [15, 25]), (5, 5, [10, 15, 20, 25]), (5, 10, [20, 30, 40, 50])],
    ids=["less_than_every_n_steps", "equal_every_n_steps", "greater_than_every_n_steps"],
)
def test_steps_per_run(tmp_path: Path, clock, every_n_steps, steps_per_run, expected_steps) -> None:
    writer = SummaryWriter(str(tmp_path))
    hook = StepCounterHook(summary_writer=writer, every_n_steps=every_n_steps, clock=clock)
    hook.begin()
    raw, mon_sess = hooked(hook, advance=False)

    def train_steps() -> None:
        raw.global_step += steps_per_run

    for _ in range(5):
        clock.advance(0.01)
        mon_sess.run(train_steps)
    hook.end(raw)
    writer.close()
    rates = read_scalars(tmp_path, "global_step/sec")
    assert sorted(rates) == expected_steps
    assert all(rate > 0 for rate in rates.values())


# --- GlobalStepWaiterHook ---------------------------------------------------------------------


def test_not_wait_for_step_zero() -> None:
    def sleep(seconds: float) -> None:
        raise AssertionError("before_run must not wait for step 0")

    hook = GlobalStepWaiterHook(wait_until_step=0, sleep=sleep)
    hook.begin()
    hook.before_run(SessionRunContext(original_args=None, session=Session()))  # type: ignore[arg-type]


def test_wait_for_step(clock, caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    sess = Session()
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)
        if len(sleeps) == 1:
            sess.global_step = 500  # another worker moved the step
        elif len(sleeps) == 2:
            sess.global_step = 1100
        else:
            raise AssertionError("before_run should return after the second sleep")

    hook = GlobalStepWaiterHook(wait_until_step=1000, clock=clock, sleep=sleep)
    hook.begin()
    run_context = SessionRunContext(original_args=None, session=sess)  # type: ignore[arg-type]
    hook.before_run(run_context)
    assert sleeps == [0.5, 0.5]
    assert messages(caplog) == [
        "Waiting for global step 1000 before starting training.",
        "Global step 1100 reached after waiting 1.0 secs.",
    ]
    hook.before_run(run_context)  # it waits only once
    assert len(sleeps) == 2


def test_wait_for_step_logs_progress_every_1000_steps(caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    sess = Session()
    progress = iter([1500, 2000, 3000])

    def sleep(seconds: float) -> None:
        sess.global_step = next(progress)

    hook = GlobalStepWaiterHook(wait_until_step=3000, sleep=sleep)
    hook.begin()
    mon_sess = HookedSession(sess, [hook])
    mon_sess.run(lambda: None)  # waits, then runs the step
    assert sess.global_step == 3001
    logged = messages(caplog)
    assert "Waiting for global step 3000 before starting training. Current step is 1500." in logged
    assert not any("Current step is 2000" in m for m in logged)  # < 1000 since the last log


# --- FinalOpsHook -----------------------------------------------------------------------------


def test_final_ops_is_scalar_tensor() -> None:
    hook = FinalOpsHook(lambda: 4)
    hook.begin()
    assert hook.final_ops_values is None
    hook.end(Session())
    assert hook.final_ops_values == 4


def test_final_ops_is_tensor() -> None:
    expected_values = [1, 6, 3, 5, 2, 4]
    hook = FinalOpsHook(lambda: np.array(expected_values))
    hook.begin()
    hook.end(Session())
    assert hook.final_ops_values.tolist() == expected_values


def test_final_ops_names_read_the_final_state() -> None:
    state = {"accuracy": torch.tensor(0.0)}
    hook = FinalOpsHook({"acc": "accuracy", "step": "global_step"})
    hook.begin()
    raw, mon_sess = hooked(hook, state=state)
    for _ in range(3):
        mon_sess.run(lambda: state["accuracy"].add_(0.25))
    hook.end(raw)
    assert float(hook.final_ops_values["acc"]) == 0.75
    assert hook.final_ops_values["step"] == 3


@pytest.mark.parametrize("error", [OutOfRangeError("End of sequence"), StopIteration()])
def test_final_ops_triggers_out_of_range_error(caplog, error: BaseException) -> None:
    data = iter(range(1))
    next(data)  # the input is exhausted when the session ends

    def read_next() -> int:
        for value in data:
            return value
        raise error

    hook = FinalOpsHook(read_next)
    hook.begin()
    with pytest.raises(type(error)):
        hook.end(Session())
    (warning,) = messages(caplog, logging.WARNING)
    assert "dependency back to some input source" in warning


def test_final_ops_with_dictionary() -> None:
    expected_values = [4, -3]
    hook = FinalOpsHook(lambda values: np.asarray(values), {"values": expected_values})
    hook.begin()
    hook.end(Session())
    assert hook.final_ops_values.tolist() == expected_values


# --- FeedFnHook -------------------------------------------------------------------------------


def test_feeding_placeholder() -> None:
    hook = FeedFnHook(feed_fn=lambda: {"x": 1.0})
    hook.begin()
    _, mon_sess = hooked(hook)
    assert mon_sess.run(lambda x: x + 1) == 2


def test_feed_fn_is_called_every_run() -> None:
    batches = iter([1.0, 2.0, 3.0])
    _, mon_sess = hooked(FeedFnHook(lambda: {"x": next(batches)}))
    assert [mon_sess.run(lambda x: x * 10) for _ in range(3)] == [10.0, 20.0, 30.0]


def test_feed_fn_conflicting_with_the_user_feed() -> None:
    _, mon_sess = hooked(FeedFnHook(lambda: {"x": 1.0}))
    with pytest.raises(RuntimeError, match="Same tensor is fed by a SessionRunHook and user"):
        mon_sess.run(lambda x: x, feed_dict={"x": 2.0})
