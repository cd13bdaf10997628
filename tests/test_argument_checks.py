"""Public constructors and factories check their arguments before doing anything.

A wrong type raises ``TypeError``, a wrong value ``ValueError``; either message names the
argument and ends with what to pass (``...: pass save_checkpoint_steps=100``). Valid
values, TensorFlow's defaults and ``None`` where TensorFlow allows it keep working, and
``~`` in a directory or checkpoint path means the home directory. The checks run at
construction only: a training step calls none of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import trainhooks as th
from trainhooks import _checks

HOOK_FIX = "pass a list of hook instances, e.g. {name}=[StopAtStepHook(last_step=100)]"


def _score(prefix: str, step: int) -> float:
    return 0.0


# (id, factory called with the bad value, the bad value, exception, argument named, fix)
# ``fix`` is the text after "pass "; None means just "<name>=".
Case = tuple[str, Callable[[Any], Any], Any, type[Exception], str, str | None]


def _number_cases(
    label: str, make: Callable[[Any], Any], name: str, *, integer: bool, suggestion: str
) -> list[Case]:
    """The mistakes every step count or period must refuse: a str, a negative, a bool..."""
    cases: list[Case] = [
        (f"{label}-str", make, suggestion, TypeError, name, f"{name}={suggestion}"),
        (f"{label}-negative", make, -5, ValueError, name, f"{name}=5"),
        (f"{label}-bool", make, True, TypeError, name, None),
        (f"{label}-list", make, [10], TypeError, name, None),
    ]
    if integer:
        cases.append((f"{label}-float", make, 1.5, TypeError, name, None))
    else:
        cases.append((f"{label}-nan", make, math.nan, ValueError, name, None))
    return cases


def _mts(**kwargs: Any) -> Callable[[Any], Any]:
    (name,) = kwargs  # the argument under test; its value is the placeholder ...
    return lambda value: th.MonitoredTrainingSession(**{name: value})


CASES: list[Case] = [
    # MonitoredTrainingSession's schedules
    *_number_cases(
        "mts-save_checkpoint_steps",
        lambda v: th.MonitoredTrainingSession(save_checkpoint_steps=v),
        "save_checkpoint_steps",
        integer=True,
        suggestion="100",
    ),
    *_number_cases(
        "mts-save_checkpoint_secs",
        lambda v: th.MonitoredTrainingSession(save_checkpoint_secs=v),
        "save_checkpoint_secs",
        integer=False,
        suggestion="600",
    ),
    *_number_cases(
        "mts-save_summaries_steps",
        lambda v: th.MonitoredTrainingSession(save_summaries_steps=v),
        "save_summaries_steps",
        integer=True,
        suggestion="100",
    ),
    *_number_cases(
        "mts-save_summaries_secs",
        lambda v: th.MonitoredTrainingSession(save_summaries_secs=v),
        "save_summaries_secs",
        integer=False,
        suggestion="30",
    ),
    *_number_cases(
        "mts-log_step_count_steps",
        lambda v: th.MonitoredTrainingSession(log_step_count_steps=v),
        "log_step_count_steps",
        integer=True,
        suggestion="100",
    ),
    ("mts-stop_grace_period_secs", _mts(stop_grace_period_secs=...), -1, ValueError, "stop_grace_period_secs", "stop_grace_period_secs=1"),
    ("mts-stop_grace_period_secs-none", _mts(stop_grace_period_secs=...), None, TypeError, "stop_grace_period_secs", None),
    ("mts-max_wait_secs", _mts(max_wait_secs=...), "7200", TypeError, "max_wait_secs", "max_wait_secs=7200"),
    ("mts-preemption_grace_period_secs", _mts(preemption_grace_period_secs=...), -3, ValueError, "preemption_grace_period_secs", "preemption_grace_period_secs=3"),
    ("mts-is_chief", _mts(is_chief=...), "yes", TypeError, "is_chief", "is_chief=True"),
    ("mts-async_checkpoint", _mts(async_checkpoint=...), 1, TypeError, "async_checkpoint", None),
    ("mts-advance_global_step", _mts(advance_global_step=...), "False", TypeError, "advance_global_step", "advance_global_step=False"),
    ("mts-state", _mts(state=...), [np.zeros(3)], TypeError, "state", None),
    ("mts-scaffold", _mts(scaffold=...), th.Scaffold, TypeError, "scaffold", None),
    ("mts-checkpoint_dir-int", _mts(checkpoint_dir=...), 3, TypeError, "checkpoint_dir", None),
    ("mts-summary_dir-bytes", _mts(summary_dir=...), b"/tmp/run", TypeError, "summary_dir", "summary_dir='/tmp/run'"),
    # StopAtStepHook
    *_number_cases("stop-last_step", lambda v: th.StopAtStepHook(last_step=v), "last_step", integer=True, suggestion="100"),
    *_number_cases("stop-num_steps", lambda v: th.StopAtStepHook(num_steps=v), "num_steps", integer=True, suggestion="100"),
    # Saver
    ("saver-max_to_keep-str", lambda v: th.Saver(max_to_keep=v), "3", TypeError, "max_to_keep", "max_to_keep=3"),
    ("saver-max_to_keep-float", lambda v: th.Saver(max_to_keep=v), 2.5, TypeError, "max_to_keep", None),
    ("saver-max_to_keep-bool", lambda v: th.Saver(max_to_keep=v), True, TypeError, "max_to_keep", None),
    ("saver-keep_hours-str", lambda v: th.Saver(keep_checkpoint_every_n_hours=v), "2", TypeError, "keep_checkpoint_every_n_hours", "keep_checkpoint_every_n_hours=2"),
    ("saver-keep_hours-negative", lambda v: th.Saver(keep_checkpoint_every_n_hours=v), -1.5, ValueError, "keep_checkpoint_every_n_hours", "keep_checkpoint_every_n_hours=1.5"),
    ("saver-keep_hours-none", lambda v: th.Saver(keep_checkpoint_every_n_hours=v), None, TypeError, "keep_checkpoint_every_n_hours", None),
    ("saver-keep_hours-nan", lambda v: th.Saver(keep_checkpoint_every_n_hours=v), math.nan, ValueError, "keep_checkpoint_every_n_hours", None),
    ("saver-pad_step_number", lambda v: th.Saver(pad_step_number=v), "yes", TypeError, "pad_step_number", None),
    ("saver-save_relative_paths", lambda v: th.Saver(save_relative_paths=v), 1, TypeError, "save_relative_paths", None),
    ("saver-filename", lambda v: th.Saver(filename=v), 3, TypeError, "filename", None),
    ("saver-allow_empty", lambda v: th.Saver(allow_empty=v), "no", TypeError, "allow_empty", "allow_empty=False"),
    ("saver-max_shard_bytes", lambda v: th.Saver(max_shard_bytes=v), "1GB", TypeError, "max_shard_bytes", None),
    ("saver-async_save", lambda v: th.Saver(async_save=v), None, TypeError, "async_save", None),
    ("saver-clock", lambda v: th.Saver(clock=v), 3.0, TypeError, "clock", "clock=time.time"),
    # timers and the hooks built on them
    *_number_cases("timer-every_steps", lambda v: th.SecondOrStepTimer(every_steps=v), "every_steps", integer=True, suggestion="3"),
    *_number_cases("timer-every_secs", lambda v: th.SecondOrStepTimer(every_secs=v), "every_secs", integer=False, suggestion="1.5"),
    ("timer-clock", lambda v: th.SecondOrStepTimer(every_steps=1, clock=v), "now", TypeError, "clock", None),
    *_number_cases("counter-every_n_steps", lambda v: th.StepCounterHook(every_n_steps=v), "every_n_steps", integer=True, suggestion="100"),
    *_number_cases("counter-every_n_secs", lambda v: th.StepCounterHook(every_n_steps=None, every_n_secs=v), "every_n_secs", integer=False, suggestion="10"),
    ("counter-summary_writer", lambda v: th.StepCounterHook(summary_writer=v), "logs", TypeError, "summary_writer", None),
    *_number_cases("summary-save_steps", lambda v: th.SummarySaverHook(save_steps=v, summary_op="loss"), "save_steps", integer=True, suggestion="100"),
    *_number_cases("summary-save_secs", lambda v: th.SummarySaverHook(save_secs=v, summary_op="loss"), "save_secs", integer=False, suggestion="60"),
    ("summary-summary_writer", lambda v: th.SummarySaverHook(save_steps=1, summary_op="l", summary_writer=v), object(), TypeError, "summary_writer", None),
    ("summary-scaffold", lambda v: th.SummarySaverHook(save_steps=1, scaffold=v), "scaffold", TypeError, "scaffold", None),
    ("logging-every_n_iter-str", lambda v: th.LoggingTensorHook(["loss"], every_n_iter=v), "10", TypeError, "every_n_iter", "every_n_iter=10"),
    ("logging-every_n_iter-float", lambda v: th.LoggingTensorHook(["loss"], every_n_iter=v), 1.5, TypeError, "every_n_iter", None),
    ("logging-every_n_iter-bool", lambda v: th.LoggingTensorHook(["loss"], every_n_iter=v), True, TypeError, "every_n_iter", None),
    *_number_cases("logging-every_n_secs", lambda v: th.LoggingTensorHook(["loss"], every_n_secs=v), "every_n_secs", integer=False, suggestion="10"),
    ("logging-at_end", lambda v: th.LoggingTensorHook(["loss"], at_end=v), "yes", TypeError, "at_end", None),
    ("logging-formatter", lambda v: th.LoggingTensorHook(["loss"], every_n_iter=1, formatter=v), "{loss}", TypeError, "formatter", None),
    *_number_cases("ckpt-save_steps", lambda v: th.CheckpointSaverHook("run", save_steps=v), "save_steps", integer=True, suggestion="100"),
    *_number_cases("ckpt-save_secs", lambda v: th.CheckpointSaverHook("run", save_secs=v), "save_secs", integer=False, suggestion="600"),
    ("ckpt-checkpoint_dir-none", lambda v: th.CheckpointSaverHook(v, save_steps=1), None, TypeError, "checkpoint_dir", None),
    ("ckpt-saver", lambda v: th.CheckpointSaverHook("run", save_steps=1, saver=v), th.Saver, TypeError, "saver", "saver=Saver("),
    ("ckpt-checkpoint_basename", lambda v: th.CheckpointSaverHook("run", save_steps=1, checkpoint_basename=v), "", ValueError, "checkpoint_basename", "checkpoint_basename='model.ckpt'"),
    ("ckpt-scaffold", lambda v: th.CheckpointSaverHook("run", save_steps=1, scaffold=v), {"w": 1}, TypeError, "scaffold", None),
    ("ckpt-async_save", lambda v: th.CheckpointSaverHook("run", save_steps=1, async_save=v), "True", TypeError, "async_save", "async_save=True"),
    ("ckpt-listeners-single", lambda v: th.CheckpointSaverHook("run", save_steps=1, listeners=v), th.CheckpointSaverListener(), TypeError, "listeners", "a list of listener instances, e.g. listeners=[BackupListener("),
    ("ckpt-listeners-class", lambda v: th.CheckpointSaverHook("run", save_steps=1, listeners=v), [th.CheckpointSaverListener], TypeError, "listeners", "a list of listener instances, e.g. listeners=[BackupListener("),
    ("ckpt-listeners-function", lambda v: th.CheckpointSaverHook("run", save_steps=1, listeners=v), [_score], TypeError, "listeners", "a list of listener instances, e.g. listeners=[BackupListener("),
    *_number_cases("profiler-save_steps", lambda v: th.ProfilerHook(save_steps=v), "save_steps", integer=True, suggestion="100"),
    *_number_cases("profiler-save_secs", lambda v: th.ProfilerHook(save_secs=v), "save_secs", integer=False, suggestion="60"),
    ("profiler-show_memory", lambda v: th.ProfilerHook(save_steps=1, show_memory=v), 0, TypeError, "show_memory", None),
    ("profiler-show_dataflow", lambda v: th.ProfilerHook(save_steps=1, show_dataflow=v), "no", TypeError, "show_dataflow", "show_dataflow=False"),
    ("profiler-output_dir", lambda v: th.ProfilerHook(save_steps=1, output_dir=v), None, TypeError, "output_dir", None),
    # the other hooks
    ("waiter-wait_until_step", lambda v: th.GlobalStepWaiterHook(v), "100", TypeError, "wait_until_step", "wait_until_step=100"),
    ("waiter-sleep", lambda v: th.GlobalStepWaiterHook(0, sleep=v), 0.5, TypeError, "sleep", "sleep=time.sleep"),
    ("final-feed_dict", lambda v: th.FinalOpsHook("w", final_ops_feed_dict=v), [("x", 1)], TypeError, "final_ops_feed_dict", None),
    ("feed-feed_fn", lambda v: th.FeedFnHook(v), {"batch": 1}, TypeError, "feed_fn", "feed_fn=lambda"),
    ("nan-loss_tensor", lambda v: th.NanTensorHook(v), 3, TypeError, "loss_tensor", "loss_tensor='loss'"),
    ("nan-fail_on_nan_loss", lambda v: th.NanTensorHook("loss", fail_on_nan_loss=v), "False", TypeError, "fail_on_nan_loss", "fail_on_nan_loss=False"),
    # listeners
    ("backup-backup_dir", lambda v: th.BackupListener(v), None, TypeError, "backup_dir", None),
    ("backup-keep_all", lambda v: th.BackupListener("b", keep_all=v), 1, TypeError, "keep_all", None),
    ("evaluation-eval_fn", lambda v: th.EvaluationListener(v), "evaluate", TypeError, "eval_fn", None),
    ("evaluation-stop_if", lambda v: th.EvaluationListener(_score, stop_if=v), 0.01, TypeError, "stop_if", None),
    ("keep_best-metric_fn", lambda v: th.KeepBestListener(v), "loss", TypeError, "metric_fn", None),
    ("keep_best-keep-str", lambda v: th.KeepBestListener(_score, keep=v), "3", TypeError, "keep", "keep=3"),
    ("keep_best-keep-bool", lambda v: th.KeepBestListener(_score, keep=v), True, TypeError, "keep", "keep=3"),
    ("keep_best-keep-zero", lambda v: th.KeepBestListener(_score, keep=v), 0, ValueError, "keep", "keep=3"),
    ("keep_best-mode", lambda v: th.KeepBestListener(_score, mode=v), min, TypeError, "mode", "mode='min'"),
    ("keep_best-subdir", lambda v: th.KeepBestListener(_score, subdir=v), 3, TypeError, "subdir", None),
    # scaffold and session creators
    ("scaffold-init_fn", lambda v: th.Scaffold(init_fn=v), "init", TypeError, "init_fn", None),
    ("scaffold-saver", lambda v: th.Scaffold(saver=v), "saver", TypeError, "saver", None),
    ("scaffold-state", lambda v: th.Scaffold(state=v), [1.0], TypeError, "state", None),
    ("chief-scaffold", lambda v: th.ChiefSessionCreator(scaffold=v), {"w": 1.0}, TypeError, "scaffold", None),
    ("chief-checkpoint_dir", lambda v: th.ChiefSessionCreator(checkpoint_dir=v), 1, TypeError, "checkpoint_dir", None),
    ("chief-checkpoint_filename_with_path", lambda v: th.ChiefSessionCreator(checkpoint_filename_with_path=v), 10, TypeError, "checkpoint_filename_with_path", None),
    ("chief-state", lambda v: th.ChiefSessionCreator(state=v), "w", TypeError, "state", None),
    ("chief-advance_global_step", lambda v: th.ChiefSessionCreator(advance_global_step=v), None, TypeError, "advance_global_step", None),
    ("worker-max_wait_secs", lambda v: th.WorkerSessionCreator(max_wait_secs=v), -1, ValueError, "max_wait_secs", "max_wait_secs=1"),
    ("worker-checkpoint_dir", lambda v: th.WorkerSessionCreator(checkpoint_dir=v), ["run"], TypeError, "checkpoint_dir", None),
    ("worker-advance_global_step", lambda v: th.WorkerSessionCreator(advance_global_step=v), "yes", TypeError, "advance_global_step", None),
]  # fmt: skip


def _assert_names_and_fix(error: BaseException, name: str, fix: str | None) -> None:
    message = str(error)
    assert message.startswith(name), message
    assert f"pass {fix or name + '='}" in message, message
    assert ": pass " in message, message


@pytest.mark.parametrize(
    ("make", "value", "error", "name", "fix"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_a_wrong_argument_is_named_with_what_to_pass(
    make: Callable[[Any], Any],
    value: Any,
    error: type[Exception],
    name: str,
    fix: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as raised:
        make(value)
    assert type(raised.value) is error  # not a subclass that would also match the other kind
    _assert_names_and_fix(raised.value, name, fix)
    assert os.listdir(tmp_path) == []  # refused before anything was created


def test_the_librarys_message_style(tmp_path: Path) -> None:
    with pytest.raises(TypeError) as raised:
        th.MonitoredTrainingSession(checkpoint_dir=str(tmp_path), save_checkpoint_steps="100")
    assert str(raised.value) == (
        "save_checkpoint_steps must be a positive int (or None), got '100' (a str): "
        "pass save_checkpoint_steps=100"
    )
    assert os.listdir(tmp_path) == []


# ---- hooks= and chief_only_hooks= -----------------------------------------------------


def _make_hook() -> th.SessionRunHook:
    return th.StopAtStepHook(last_step=100)


HOOK_MISTAKES = [
    pytest.param(_make_hook(), "got a single StopAtStepHook", id="a-single-hook"),
    pytest.param(th.StopAtStepHook, "the class StopAtStepHook", id="a-hook-class"),
    pytest.param([th.StopAtStepHook], "[0] is the class StopAtStepHook, not an instance", id="a-list-of-classes"),
    pytest.param(_make_hook, "the function _make_hook", id="a-function"),
    pytest.param([_make_hook(), _make_hook], "[1] is the function _make_hook, not a hook", id="a-list-with-a-function"),
    pytest.param("StopAtStepHook", "'StopAtStepHook' (a str)", id="a-str"),
    pytest.param({"stop": _make_hook()}, "(a dict)", id="a-dict"),
    pytest.param([None], "[0] is None (a NoneType), not a hook", id="a-list-with-none"),
]  # fmt: skip


@pytest.mark.parametrize("name", ["hooks", "chief_only_hooks"])
@pytest.mark.parametrize(("value", "what"), HOOK_MISTAKES)
def test_hooks_must_be_a_list_of_hook_instances(
    name: str, value: Any, what: str, tmp_path: Path
) -> None:
    with pytest.raises(TypeError) as raised:
        th.MonitoredTrainingSession(checkpoint_dir=str(tmp_path), **{name: value})
    message = str(raised.value)
    assert message.startswith(name), message
    assert what in message, message
    assert message.endswith(HOOK_FIX.format(name=name)), message
    assert os.listdir(tmp_path) == []  # no lock, no checkpoint, no event file


def test_hook_lists_may_be_any_iterable_of_hooks(tmp_path: Path) -> None:
    stop = th.StopAtStepHook(last_step=3)
    counter = th.StepCounterHook(every_n_steps=1)
    with th.MonitoredTrainingSession(
        state={"w": np.zeros(2)},
        hooks=(h for h in [stop]),  # a generator is read once, at construction
        chief_only_hooks=(counter,),
        save_summaries_steps=None,
        log_step_count_steps=None,
    ) as sess:
        steps = 0
        while not sess.should_stop():
            sess.run(lambda: None)
            steps += 1
    assert steps == 3


# ---- directories ----------------------------------------------------------------------


def _a_file(tmp_path: Path) -> str:
    path = tmp_path / "checkpoint"  # the state file, a common mistake for its directory
    path.write_text("")
    return str(path)


DIRECTORY_ARGUMENTS = [
    pytest.param(lambda d: th.MonitoredTrainingSession(checkpoint_dir=d), "checkpoint_dir", id="mts"),
    pytest.param(lambda d: th.MonitoredTrainingSession(summary_dir=d), "summary_dir", id="mts-summary_dir"),
    pytest.param(lambda d: th.CheckpointSaverHook(d, save_steps=1), "checkpoint_dir", id="checkpoint-hook"),
    pytest.param(lambda d: th.ChiefSessionCreator(checkpoint_dir=d), "checkpoint_dir", id="chief"),
    pytest.param(lambda d: th.WorkerSessionCreator(checkpoint_dir=d), "checkpoint_dir", id="worker"),
    pytest.param(lambda d: th.SingularMonitoredSession(checkpoint_dir=d), "checkpoint_dir", id="singular"),
    pytest.param(lambda d: th.BackupListener(d), "backup_dir", id="backup"),
    pytest.param(lambda d: th.StepCounterHook(output_dir=d), "output_dir", id="step-counter"),
    pytest.param(lambda d: th.SummarySaverHook(save_steps=1, output_dir=d, summary_op="l"), "output_dir", id="summary"),
    pytest.param(lambda d: th.ProfilerHook(save_steps=1, output_dir=d), "output_dir", id="profiler"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "name"), DIRECTORY_ARGUMENTS)
def test_a_file_is_not_a_directory(make: Callable[[str], Any], name: str, tmp_path: Path) -> None:
    path = _a_file(tmp_path)
    with pytest.raises(ValueError) as raised:
        make(path)
    assert str(raised.value) == (
        f"{name} {path!r} is a file, not a directory: pass the directory it is in, or "
        f"another one, e.g. {name}={str(tmp_path)!r}"
    )
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``~`` is ``tmp_path/home`` (``os.path.expanduser`` reads ``HOME``)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)  # an unexpanded "~" would land in tmp_path/~
    return home


def _train(steps: int, **kwargs: Any) -> dict[str, Any]:
    state = {"w": np.zeros(2)}
    options = {"save_summaries_steps": None, "log_step_count_steps": None, **kwargs}
    with th.MonitoredTrainingSession(
        state=state, hooks=[th.StopAtStepHook(last_step=steps)], **options
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: state["w"].__iadd__(1.0))
    return state


def test_a_home_relative_checkpoint_dir_is_expanded(home: Path, tmp_path: Path) -> None:
    _train(2, checkpoint_dir="~/run", save_checkpoint_steps=1)
    assert th.latest_checkpoint(str(home / "run")) == str(home / "run" / "model.ckpt-2")
    assert not (tmp_path / "~").exists()
    # The session creators restore from the same "~/run".
    for creator in (
        th.ChiefSessionCreator(state={"w": np.zeros(2)}, checkpoint_dir="~/run"),
        th.WorkerSessionCreator(state={"w": np.zeros(2)}, checkpoint_dir="~/run"),
        th.ChiefSessionCreator(
            state={"w": np.zeros(2)}, checkpoint_filename_with_path="~/run/model.ckpt-1"
        ),
    ):
        sess = creator.create_session()
        assert sess.global_step in (1, 2)
        np.testing.assert_array_equal(sess.state["w"], np.full(2, float(sess.global_step)))
    assert not (tmp_path / "~").exists()


def test_paths_given_to_hooks_and_the_saver_are_expanded(home: Path, tmp_path: Path) -> None:
    hook = th.CheckpointSaverHook("~/run", save_steps=1)
    assert hook.checkpoint_dir == str(home / "run")
    assert th.BackupListener("~/backup").backup_dir == str(home / "backup")
    (home / "run").mkdir()
    sess = th.Session({"w": np.ones(2)}, global_step=7)
    saver = th.Saver()
    try:
        prefix = saver.save(sess, "~/run/model.ckpt", global_step=7)
        assert prefix == str(home / "run" / "model.ckpt-7")
        restored = th.Session({"w": np.zeros(2)})
        saver.restore(restored, "~/run/model.ckpt-7")
        assert restored.global_step == 7
        again = th.Session({"w": np.zeros(2)})
        assert saver.restore_latest(again, "~/run") == prefix
        np.testing.assert_array_equal(again.state["w"], np.ones(2))
        by_filename = th.Saver(filename="~/run/other.ckpt")
        assert by_filename.save(sess, None) == str(home / "run" / "other.ckpt")
        by_filename.close()
    finally:
        saver.close()
    assert not (tmp_path / "~").exists()


def test_paths_with_a_scheme_are_left_alone() -> None:
    assert th.CheckpointSaverHook("memory://run/~", save_steps=1).checkpoint_dir == "memory://run/~"
    assert _checks.path("save_path", "file://~/x") == "file://~/x"


# ---- valid values ---------------------------------------------------------------------


VALID = [
    pytest.param(lambda: th.StopAtStepHook(last_step=0), id="stop-last_step-0"),
    pytest.param(lambda: th.StopAtStepHook(num_steps=np.int64(10)), id="stop-numpy-int"),
    pytest.param(lambda: th.StepCounterHook(), id="step-counter-defaults"),
    pytest.param(lambda: th.StepCounterHook(every_n_steps=None, every_n_secs=0.5), id="step-counter-secs"),
    pytest.param(lambda: th.SecondOrStepTimer(every_steps=0), id="timer-every-step"),
    pytest.param(lambda: th.SecondOrStepTimer(every_secs=np.float32(1.5)), id="timer-numpy-float"),
    pytest.param(lambda: th.SecondOrStepTimer(every_secs=math.inf), id="timer-never"),
    pytest.param(lambda: th.SummarySaverHook(save_steps=100, summary_op="loss"), id="summary"),
    pytest.param(lambda: th.SummarySaverHook(save_secs=30, scaffold=th.Scaffold()), id="summary-scaffold"),
    pytest.param(lambda: th.LoggingTensorHook("loss", at_end=True), id="logging-at-end"),
    pytest.param(lambda: th.LoggingTensorHook({"l": "loss"}, every_n_secs=10, formatter=str), id="logging-secs"),
    pytest.param(lambda: th.CheckpointSaverHook("run", save_secs=600), id="ckpt-secs"),
    pytest.param(lambda: th.CheckpointSaverHook(Path("run"), save_steps=0, listeners=()), id="ckpt-every-step"),
    pytest.param(lambda: th.CheckpointSaverHook("run", save_steps=1, saver=th.Saver(), listeners=[th.CheckpointSaverListener()]), id="ckpt-saver-listener"),
    pytest.param(lambda: th.CheckpointSaverHook("run", save_steps=1, scaffold=th.Scaffold(), async_save=np.bool_(True)), id="ckpt-async"),
    pytest.param(lambda: th.ProfilerHook(save_steps=10), id="profiler-defaults"),
    pytest.param(lambda: th.GlobalStepWaiterHook(wait_until_step=-1), id="waiter"),
    pytest.param(lambda: th.FinalOpsHook(None, final_ops_feed_dict={"x": 1}), id="final-ops"),
    pytest.param(lambda: th.FeedFnHook(dict), id="feed-fn"),
    pytest.param(lambda: th.NanTensorHook(lambda: 1.0, fail_on_nan_loss=False), id="nan-callable"),
    pytest.param(lambda: th.BackupListener(Path("backup"), keep_all=True), id="backup"),
    pytest.param(lambda: th.EvaluationListener(_score, every_n_steps=None, stop_if=None), id="evaluation"),
    pytest.param(lambda: th.KeepBestListener(_score, keep=1, mode="max", subdir="top"), id="keep-best"),
    pytest.param(lambda: th.Saver(), id="saver-defaults"),
    pytest.param(lambda: th.Saver(max_to_keep=None, keep_checkpoint_every_n_hours=0), id="saver-keep-all"),
    pytest.param(lambda: th.Saver(max_to_keep=0, keep_checkpoint_every_n_hours=2, filename=Path("m.ckpt")), id="saver-path-filename"),
    pytest.param(lambda: th.Saver(max_to_keep=np.int32(3), max_shard_bytes=2**20, allow_empty=True, async_save=False), id="saver-numpy-int"),
    pytest.param(lambda: th.Scaffold(init_fn=None, saver=None, state=None), id="scaffold-none"),
    pytest.param(lambda: th.ChiefSessionCreator(), id="chief-defaults"),
    pytest.param(lambda: th.ChiefSessionCreator(checkpoint_dir=None, checkpoint_filename_with_path=None), id="chief-none"),
    pytest.param(lambda: th.WorkerSessionCreator(max_wait_secs=0), id="worker"),
]  # fmt: skip


@pytest.mark.parametrize("make", VALID)
def test_valid_values_still_work(
    make: Callable[[], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    made = make()
    if isinstance(made, th.Saver):
        made.close()


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="tf-defaults"),
        pytest.param({"save_checkpoint_steps": None, "save_checkpoint_secs": None}, id="no-checkpoints"),
        pytest.param({"save_checkpoint_steps": 0, "save_summaries_steps": 0, "log_step_count_steps": 0}, id="zero-is-off"),
        pytest.param({"save_checkpoint_secs": 0.5, "save_summaries_secs": 60}, id="seconds"),
        pytest.param({"save_checkpoint_steps": np.int64(1), "log_step_count_steps": None}, id="numpy-steps"),
        pytest.param({"chief_only_hooks": None, "preemption_grace_period_secs": None}, id="none"),
        pytest.param({"is_chief": False, "max_wait_secs": 0, "stop_grace_period_secs": 0}, id="worker"),
        pytest.param({"async_checkpoint": True, "advance_global_step": True, "scaffold": th.Scaffold()}, id="async"),
    ],
)  # fmt: skip
def test_monitored_training_session_accepts_tfs_values(
    kwargs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    state = _train(2, checkpoint_dir=Path(tmp_path / "run"), summary_dir=None, **kwargs)
    np.testing.assert_array_equal(state["w"], np.full(2, 2.0))


# ---- cost ------------------------------------------------------------------------------


def test_no_check_runs_during_a_training_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    state = {"w": np.zeros(2)}
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        state=state,
        save_checkpoint_steps=1000,
        save_summaries_steps=5,
        log_step_count_steps=5,
        hooks=[
            th.StopAtStepHook(last_step=20),
            th.NanTensorHook("loss"),
            th.LoggingTensorHook(["loss"], every_n_iter=5),
        ],
    ) as sess:
        for name in _checks.__all__:
            check = getattr(_checks, name)

            def counted(*args: Any, _check: Any = check, _name: str = name, **kw: Any) -> Any:
                calls.append(_name)
                return _check(*args, **kw)

            monkeypatch.setattr(_checks, name, counted)
        while not sess.should_stop():
            sess.run(lambda: {"loss": float(state["w"].sum())})
        assert calls == []
