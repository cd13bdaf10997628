"""LoggingTensorHook and NanTensorHook (hooks/tensors.py), ported from TF's basic_session_run_hooks_test.

As in TF, each hook is driven by a raw ``Session`` wrapped in ``HookedSession([hook])``;
``advance_global_step=False`` plus setting ``global_step`` emulates assigning the step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from tests.helpers.hooks import hooked, log_messages

import trainhooks as th
from trainhooks.hooks.tensors import (
    LoggingTensorHook,
    NanLossDuringTrainingError,
    NanTensorHook,
)

BASIC = "trainhooks.hooks.tensors"


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return log_messages(caplog, BASIC, level)


# --- LoggingTensorHook ------------------------------------------------------------------------


def test_logging_tensor_illegal_args() -> None:
    with pytest.raises(ValueError, match="nvalid every_n_iter"):
        LoggingTensorHook(tensors=["t"], every_n_iter=0)
    with pytest.raises(ValueError, match="nvalid every_n_iter"):
        LoggingTensorHook(tensors=["t"], every_n_iter=-10)
    with pytest.raises(ValueError, match="xactly one of"):
        LoggingTensorHook(tensors=["t"], every_n_iter=5, every_n_secs=5)
    with pytest.raises(ValueError, match="xactly one of"):
        LoggingTensorHook(tensors=["t"])
    with pytest.raises(TypeError, match=r"fetch names \(str\).*pass a dict"):
        LoggingTensorHook(tensors=[lambda: 1.0], every_n_iter=1)


def test_print_at_end_only(caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = LoggingTensorHook(tensors=["foo"], at_end=True)
    hook.begin()
    raw, mon_sess = hooked(hook, state={"foo": 42.0})
    for _ in range(3):
        mon_sess.run(lambda: 3)
        assert messages(caplog) == []
    hook.end(raw)
    assert messages(caplog) == ["foo = 42.0"]


def test_print_at_end_logs_the_last_step_output(caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = LoggingTensorHook(tensors={"loss": "loss", "step": "global_step"}, at_end=True)
    hook.begin()
    raw, mon_sess = hooked(hook)
    for loss in (3.0, 2.0, 1.5):
        mon_sess.run(lambda loss=loss: {"loss": loss})
    hook.end(raw)  # "loss" exists only inside a run: the last run's value is logged
    assert messages(caplog) == ["loss = 1.5, step = 3"]


def _validate_print_every_n_steps(caplog, at_end: bool) -> None:
    hook = LoggingTensorHook(tensors=["foo"], every_n_iter=10, at_end=at_end)
    hook.begin()
    raw, mon_sess = hooked(hook, state={"foo": 42.0})
    caplog.clear()
    mon_sess.run(lambda: 3)
    assert messages(caplog) == ["foo = 42.0"]
    for _ in range(3):
        caplog.clear()
        for _ in range(9):
            mon_sess.run(lambda: 3)
            assert messages(caplog) == []
        mon_sess.run(lambda: 3)
        assert len(messages(caplog)) == 1
        assert messages(caplog)[0].startswith("foo = 42.0 (")

    # One more run to check that the count restarts after each log.
    caplog.clear()
    mon_sess.run(lambda: 3)
    assert messages(caplog) == []

    hook.end(raw)
    assert len(messages(caplog)) == (1 if at_end else 0)


@pytest.mark.parametrize("at_end", [False, True])
def test_print_every_n_steps(caplog, at_end: bool) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    _validate_print_every_n_steps(caplog, at_end)
    _validate_print_every_n_steps(caplog, at_end)  # a second hook, to check the reset


def test_every_n_iter_counts_runs_not_global_steps(caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = LoggingTensorHook(tensors=["global_step"], every_n_iter=2)
    hook.begin()
    raw, mon_sess = hooked(hook, advance=False)

    def jump() -> None:
        raw.global_step += 100

    for _ in range(5):
        mon_sess.run(jump)
    assert [m.split(" (")[0] for m in messages(caplog)] == [
        "global_step = 100",
        "global_step = 300",
        "global_step = 500",
    ]


def test_begin_resets_the_iteration_count(caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = LoggingTensorHook(tensors=["foo"], every_n_iter=3)
    hook.begin()
    _, mon_sess = hooked(hook, state={"foo": 1})
    mon_sess.run(lambda: 3)
    mon_sess.run(lambda: 3)
    caplog.clear()
    hook.begin()
    _, mon_sess = hooked(hook, state={"foo": 1})
    mon_sess.run(lambda: 3)  # the first run after begin logs again
    assert messages(caplog) == ["foo = 1"]


def test_print_first_step(clock, caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = LoggingTensorHook(tensors={"foo": "foo"}, every_n_iter=1, clock=clock)
    hook.begin()
    _, mon_sess = hooked(hook, state={"foo": 42.0})
    mon_sess.run(lambda: 3)
    assert messages(caplog) == ["foo = 42.0"]  # no elapsed time on the first log
    clock.advance(0.25)
    mon_sess.run(lambda: 3)
    assert messages(caplog)[1] == "foo = 42.0 (0.250 sec)"


def _validate_print_every_n_secs(caplog, clock, at_end: bool) -> None:
    hook = LoggingTensorHook(tensors=["foo"], every_n_secs=1.0, at_end=at_end, clock=clock)
    hook.begin()
    raw, mon_sess = hooked(hook, state={"foo": 42.0})
    caplog.clear()
    mon_sess.run(lambda: 3)
    assert messages(caplog) == ["foo = 42.0"]

    caplog.clear()
    mon_sess.run(lambda: 3)
    assert messages(caplog) == []
    clock.advance(1.0)

    caplog.clear()
    mon_sess.run(lambda: 3)
    assert messages(caplog) == ["foo = 42.0 (1.000 sec)"]

    caplog.clear()
    hook.end(raw)
    assert len(messages(caplog)) == (1 if at_end else 0)


@pytest.mark.parametrize("at_end", [False, True])
def test_print_every_n_secs(caplog, clock, at_end: bool) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    _validate_print_every_n_secs(caplog, clock, at_end)
    _validate_print_every_n_secs(caplog, clock, at_end)


def test_print_formatter(caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = LoggingTensorHook(
        tensors=["foo"], every_n_iter=10, formatter=lambda items: f"qqq={items['foo']}"
    )
    hook.begin()
    _, mon_sess = hooked(hook, state={"foo": 42.0})
    mon_sess.run(lambda: 3)
    assert messages(caplog) == ["qqq=42.0"]


def test_logs_step_outputs_callables_and_arrays_without_scientific_notation(caplog) -> None:
    caplog.set_level(logging.INFO, logger=BASIC)
    hook = LoggingTensorHook(tensors={"loss": "loss", "lr": lambda: 0.5, "w": "w"}, every_n_iter=1)
    hook.begin()
    _, mon_sess = hooked(hook, state={"w": np.array([1e-7, 1.0])})
    mon_sess.run(lambda: {"loss": 0.125})
    assert messages(caplog) == ["loss = 0.125, lr = 0.5, w = [0.0000001 1.       ]"]
    assert np.get_printoptions()["suppress"] is False  # restored afterwards


# --- NanTensorHook ----------------------------------------------------------------------------


def test_nan_tensor_hook_does_not_stop_on_a_finite_loss() -> None:
    hook = NanTensorHook("loss")
    _, mon_sess = hooked(hook)
    mon_sess.run(lambda: {"loss": 42.0})
    assert not mon_sess.should_stop()


def test_nan_tensor_hook_raises_on_nan(caplog) -> None:
    hook = NanTensorHook("loss", fail_on_nan_loss=True)
    _, mon_sess = hooked(hook)
    with pytest.raises(NanLossDuringTrainingError) as excinfo:
        mon_sess.run(lambda: {"loss": float("nan")})
    assert str(excinfo.value) == "NaN loss during training."
    assert isinstance(excinfo.value, RuntimeError)
    assert isinstance(excinfo.value, th.errors.Error)
    assert messages(caplog, logging.ERROR) == ["Model diverged with loss = NaN."]


def test_nan_tensor_hook_requests_stop_without_fail(caplog) -> None:
    hook = NanTensorHook("loss", fail_on_nan_loss=False)
    _, mon_sess = hooked(hook)
    mon_sess.run(lambda: {"loss": np.float32("nan")})
    assert mon_sess.should_stop()
    assert messages(caplog, logging.WARNING) == ["Model diverged with loss = NaN."]


@pytest.mark.parametrize(
    ("loss", "is_nan"),
    [
        (torch.tensor(float("nan")), True),
        (torch.tensor([1.0, float("nan")]), True),
        (torch.tensor(0.5, dtype=torch.bfloat16), False),
        (np.array([1.0, math.nan]), True),
        (np.array(2.0), False),
        (3, False),
    ],
)
def test_nan_tensor_hook_checks_tensors_and_arrays(loss: Any, is_nan: bool) -> None:
    hook = NanTensorHook(lambda: loss, fail_on_nan_loss=False)
    _, mon_sess = hooked(hook)
    mon_sess.run(lambda: None)
    assert mon_sess.should_stop() is is_nan


def test_nan_tensor_hook_names_a_missing_loss() -> None:
    _, mon_sess = hooked(NanTensorHook("loss"))
    with pytest.raises(TypeError, match="the loss 'loss' is None"):
        mon_sess.run(lambda: {"loss": None})
