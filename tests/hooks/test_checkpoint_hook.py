"""CheckpointSaverHook and CheckpointSaverListener, ported from TF's basic_session_run_hooks_test.

Like TF's tests, most cases drive the hook by hand: a raw ``Session`` wrapped in a
``HookedSession([hook])`` after ``hook.begin()``, with ``after_create_session`` called
only where TF's test calls it. "ckpt=N" is ``load_variable(checkpoint_dir,
"global_step") == N``: the latest checkpoint on disk holds step N.

TF cases with no graph-free counterpart: ``test_summary_writer_defs``,
``test_save_graph_def`` and ``test_save_graph_def_false`` (no graph, meta graph or
summary writer); ``_set_steps_per_run`` (the hook always reads the real step).
"""

from __future__ import annotations

import doctest
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.helpers.checkpoints import listed_steps, new_state
from tests.helpers.hooks import RaiseOnceAtCountN
from tests.helpers.listeners import RecordingListener

import trainhooks as th
from trainhooks import errors
from trainhooks.hooks import checkpoint as checkpoint_module
from trainhooks.session.hooked import HookedSession
from trainhooks.session.session import Session


def ckpt(checkpoint_dir: Path | str) -> int:
    """The global step of the latest checkpoint in ``checkpoint_dir``."""
    return int(th.load_variable(str(checkpoint_dir), "global_step"))


def hooked(
    hook: th.CheckpointSaverHook, state: dict[str, Any] | None = None, **session_kwargs: Any
) -> tuple[Session, HookedSession, Callable[[], None]]:
    """TF's setUp: begin the hook, make the raw session, wrap it; returns a train op."""
    hook.begin()
    sess = Session(new_state() if state is None else state, **session_kwargs)

    def train_op() -> None:  # the session adds 1 to the global step; change the state too
        sess.state["w"] += 1

    return sess, HookedSession(sess, [hook]), train_op


# ---- constructor ---------------------------------------------------------------------


def test_saves_when_saver_and_scaffold_both_missing(tmp_path: Path) -> None:
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1)
    _, mon, train_op = hooked(hook)
    mon.run(train_op)
    assert ckpt(tmp_path) == 1
    assert isinstance(hook.saver, th.Saver)  # the default saver the hook created


def test_raise_when_saver_and_scaffold_both_present(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape("You cannot provide both saver and scaffold.")):
        th.CheckpointSaverHook(
            tmp_path, save_steps=1, saver=th.Saver(), scaffold=th.Scaffold().finalize()
        )


def test_raise_in_both_secs_and_steps(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=re.escape("Can not provide both every_secs and every_steps.")
    ):
        th.CheckpointSaverHook(tmp_path, save_secs=10, save_steps=20)


def test_raise_in_none_secs_and_steps(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=re.escape("Either every_secs or every_steps should be provided.")
    ):
        th.CheckpointSaverHook(tmp_path)


def test_constructor_logs_like_tf(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trainhooks.hooks.checkpoint"):
        th.CheckpointSaverHook(tmp_path, save_steps=1)
    assert "Create CheckpointSaverHook." in caplog.messages


def test_uses_the_scaffolds_saver(tmp_path: Path) -> None:
    scaffold = th.Scaffold(saver=th.Saver(max_to_keep=2)).finalize()
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, scaffold=scaffold)
    _, mon, train_op = hooked(hook)
    for _ in range(4):
        mon.run(train_op)
    assert hook.saver is scaffold.saver
    assert listed_steps(tmp_path) == [3, 4]  # the scaffold saver's max_to_keep=2 applies
    assert sorted(p.name for p in tmp_path.glob("model.ckpt-*")) == ["model.ckpt-3", "model.ckpt-4"]


def test_unfinalized_scaffold_without_saver_names_the_fix(tmp_path: Path) -> None:
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, scaffold=th.Scaffold())
    _, mon, train_op = hooked(hook)
    with pytest.raises(RuntimeError, match="finalize the scaffold first, or pass saver="):
        mon.run(train_op)


def test_begin_creates_the_checkpoint_dir(tmp_path: Path) -> None:
    checkpoint_dir = tmp_path / "a" / "b"
    hook = th.CheckpointSaverHook(checkpoint_dir, save_steps=1, checkpoint_basename="m")
    _, mon, train_op = hooked(hook)
    mon.run(train_op)
    assert th.latest_checkpoint(str(checkpoint_dir)) == str(checkpoint_dir / "m-1")
    assert hook.last_checkpoint_path == str(checkpoint_dir / "m-1")


# ---- CheckpointSaverHookTest ---------------------------------------------------------


def test_save_secs_saves_in_first_step(tmp_path: Path, clock: Any) -> None:
    hook = th.CheckpointSaverHook(tmp_path, save_secs=2, clock=clock)
    _, mon, train_op = hooked(hook)
    mon.run(train_op)
    assert ckpt(tmp_path) == 1


def test_save_secs_calls_listeners_at_begin_and_end(tmp_path: Path, clock: Any) -> None:
    listener = RecordingListener()
    hook = th.CheckpointSaverHook(tmp_path, save_secs=2, listeners=[listener], clock=clock)
    sess, mon, train_op = hooked(hook)
    mon.run(train_op)  # saved
    mon.run(train_op)  # not saved
    hook.end(sess)  # saved
    assert listener.get_counts() == {"begin": 1, "before_save": 2, "after_save": 2, "end": 1}
    assert ckpt(tmp_path) == 2


def test_listener_with_monitored_session(tmp_path: Path) -> None:
    listener = RecordingListener()
    scaffold = th.Scaffold(state=new_state())
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, scaffold=scaffold, listeners=[listener])
    with th.SingularMonitoredSession(
        hooks=[hook], scaffold=scaffold, checkpoint_dir=str(tmp_path)
    ) as sess:
        sess.run(lambda: None)
        sess.run(lambda: None)
        global_step = sess.raw_session().global_step
    assert global_step == 2
    assert listener.get_counts() == {"begin": 1, "before_save": 3, "after_save": 3, "end": 1}


def test_listener_stops_training_in_after_save(tmp_path: Path) -> None:
    listener = RecordingListener()
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener])
    _, mon, train_op = hooked(hook)
    mon.run(train_op)
    assert not mon.should_stop()
    mon.run(train_op)
    assert not mon.should_stop()
    listener.ask_for_stop = True
    mon.run(train_op)
    assert mon.should_stop()


def test_listener_with_default_saver(tmp_path: Path) -> None:
    listener = RecordingListener()
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener])
    with th.SingularMonitoredSession(
        hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
    ) as sess:
        sess.run(lambda: None)
        sess.run(lambda: None)
        global_step = sess.raw_session().global_step
    assert global_step == 2
    assert listener.get_counts() == {"begin": 1, "before_save": 3, "after_save": 3, "end": 1}
    with th.SingularMonitoredSession(checkpoint_dir=str(tmp_path), state=new_state()) as sess2:
        assert sess2.raw_session().global_step == 2


def test_two_listeners_with_default_saver(tmp_path: Path) -> None:
    listener1, listener2 = RecordingListener(), RecordingListener()
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[listener1, listener2])
    with th.SingularMonitoredSession(
        hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
    ) as sess:
        sess.run(lambda: None)
        sess.run(lambda: None)
        global_step = sess.raw_session().global_step
    assert global_step == 2
    expected = {"begin": 1, "before_save": 3, "after_save": 3, "end": 1}
    assert listener1.get_counts() == expected == listener2.get_counts()
    with th.SingularMonitoredSession(checkpoint_dir=str(tmp_path), state=new_state()) as sess2:
        assert sess2.raw_session().global_step == 2


def test_save_secs_saves_periodically(tmp_path: Path, clock: Any) -> None:
    hook = th.CheckpointSaverHook(tmp_path, save_secs=2, clock=clock)
    _, mon, train_op = hooked(hook)
    start = clock.now
    mon.run(train_op)  # step 1, saved
    assert ckpt(tmp_path) == 1
    clock.set(start + 0.5)
    mon.run(train_op)  # step 2, not saved
    assert ckpt(tmp_path) == 1
    clock.set(start + 2.5)
    mon.run(train_op)  # step 3, saved
    assert ckpt(tmp_path) == 3
    clock.set(start + 2.6)
    mon.run(train_op)  # step 4, not saved
    clock.set(start + 2.7)
    mon.run(train_op)  # step 5, not saved
    assert ckpt(tmp_path) == 3
    clock.set(start + 10)
    mon.run(train_op)  # step 6, saved
    assert ckpt(tmp_path) == 6


def test_save_secs_calls_listeners_periodically(tmp_path: Path, clock: Any) -> None:
    listener = RecordingListener()
    hook = th.CheckpointSaverHook(tmp_path, save_secs=2, listeners=[listener], clock=clock)
    sess, mon, train_op = hooked(hook)
    start = clock.now
    for offset in (0.5, 0.5, 3.0, 3.5, 4.0, 6.5, 7.0):  # saves at steps 1, 3, 6
        clock.set(start + offset)
        mon.run(train_op)
    clock.set(start + 7.5)
    hook.end(sess)  # saves 7
    assert listener.get_counts() == {"begin": 1, "before_save": 4, "after_save": 4, "end": 1}
    assert ckpt(tmp_path) == 7


def test_save_steps_saves_in_first_step(tmp_path: Path) -> None:
    hook = th.CheckpointSaverHook(tmp_path, save_steps=2)
    _, mon, train_op = hooked(hook)
    mon.run(train_op)
    assert ckpt(tmp_path) == 1


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_save_steps_saves_periodically(tmp_path: Path, framework: str) -> None:
    # The torch variant is the graph-free ResourceCheckpointSaverHookTest: the step is
    # the same, the state lives in a torch module instead of a NumPy array.
    state: dict[str, Any] = (
        new_state() if framework == "numpy" else {"w": torch.nn.Linear(2, 1, bias=False)}
    )
    hook = th.CheckpointSaverHook(tmp_path, save_steps=2)
    _, mon, _ = hooked(hook, state=state)
    expected = [1, 1, 3, 3, 5]
    for want in expected:
        mon.run(lambda: None)
        assert ckpt(tmp_path) == want


def test_save_saves_at_end(tmp_path: Path, clock: Any) -> None:
    hook = th.CheckpointSaverHook(tmp_path, save_secs=2, clock=clock)
    sess, mon, train_op = hooked(hook)
    mon.run(train_op)
    mon.run(train_op)
    hook.end(sess)
    assert ckpt(tmp_path) == 2
    # The final checkpoint holds the final state, not only the step.
    restored = Session(new_state())
    th.Saver().restore(restored, str(tmp_path / "model.ckpt-2"))
    np.testing.assert_array_equal(restored.state["w"], np.full(3, 2, np.float32))


def test_save_checkpoint_before_first_train_step(tmp_path: Path) -> None:
    hook = th.CheckpointSaverHook(tmp_path, save_steps=2)
    sess, mon, train_op = hooked(hook)
    hook.after_create_session(sess, th.Coordinator())
    assert ckpt(tmp_path) == 0
    mon.run(train_op)
    assert ckpt(tmp_path) == 0
    mon.run(train_op)
    assert ckpt(tmp_path) == 2


def test_stop_request_at_session_creation_and_end_is_ignored(tmp_path: Path) -> None:
    listener = RecordingListener()
    listener.ask_for_stop = True
    hook = th.CheckpointSaverHook(tmp_path, save_steps=10, listeners=[listener])
    with th.SingularMonitoredSession(
        hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
    ) as sess:
        assert not sess.should_stop()  # the save at creation cannot stop training
        sess.run(lambda: None)
        assert not sess.should_stop()  # step 1 was not a save step
    assert listener.get_counts() == {"begin": 1, "before_save": 2, "after_save": 2, "end": 1}
    assert listed_steps(tmp_path) == [0, 1]


def test_logs_tf_lines_and_each_stop_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stopper1, stopper2 = RecordingListener(), RecordingListener()
    stopper1.ask_for_stop = stopper2.ask_for_stop = True
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[stopper1, stopper2])
    _, mon, train_op = hooked(hook)
    with caplog.at_level(logging.INFO, logger="trainhooks.hooks.checkpoint"):
        mon.run(train_op)
    save_path = os.path.join(str(tmp_path), "model.ckpt")
    messages = caplog.messages
    assert messages[:3] == [
        "Calling checkpoint listeners before saving checkpoint 1...",
        f"Saving checkpoints for 1 into {save_path}.",
        "Calling checkpoint listeners after saving checkpoint 1...",
    ]
    requests = [m for m in messages if "requested that training be stopped" in m]
    assert len(requests) == 2
    assert stopper2.get_counts()["after_save"] == 1  # no short-circuit after the first request
    assert mon.should_stop()


# ---- CheckpointSaverHookMultiStepTest: the step grows by 5 per run -------------------


def multi_step(tmp_path: Path, **hook_kwargs: Any) -> tuple[Session, HookedSession, Any]:
    hook = th.CheckpointSaverHook(tmp_path, save_steps=10, **hook_kwargs)
    sess, mon, _ = hooked(hook, advance_global_step=False)

    def train_op() -> None:
        sess.global_step += 5

    return sess, mon, train_op


def test_multi_step_saves_in_first_step(tmp_path: Path) -> None:
    _, mon, train_op = multi_step(tmp_path)
    mon.run(train_op)
    assert ckpt(tmp_path) == 5


def test_multi_step_saves_periodically(tmp_path: Path) -> None:
    _, mon, train_op = multi_step(tmp_path)
    for want in (5, 5, 15, 15, 25):  # steps 5, 10, 15, 20, 25
        mon.run(train_op)
        assert ckpt(tmp_path) == want


def test_multi_step_saves_at_end(tmp_path: Path) -> None:
    listener = RecordingListener()
    hook = th.CheckpointSaverHook(tmp_path, save_steps=10, listeners=[listener])
    sess, mon, _ = hooked(hook, advance_global_step=False)

    def train_op() -> None:
        sess.global_step += 5

    mon.run(train_op)
    mon.run(train_op)
    hook.end(sess)
    assert ckpt(tmp_path) == 10
    assert listener.get_counts() == {"begin": 1, "before_save": 2, "after_save": 2, "end": 1}


# ---- event sequences -----------------------------------------------------------------


def test_listeners_are_called_in_order_around_each_save(tmp_path: Path) -> None:
    events: list[Any] = []
    hook = th.CheckpointSaverHook(
        tmp_path,
        save_steps=2,
        listeners=[RecordingListener(events, "a."), RecordingListener(events, "b.")],
    )
    with th.SingularMonitoredSession(
        hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
    ) as sess:
        for _ in range(3):
            sess.run(lambda: None)
    assert events == [
        "a.begin", "b.begin",
        "a.bs0", "b.bs0", "a.as0", "b.as0",
        "a.bs2", "b.bs2", "a.as2", "b.as2",
        "a.bs3", "b.bs3", "a.as3", "b.as3",
        "a.end3", "b.end3",
    ]  # fmt: skip


def test_listener_sees_a_committed_checkpoint_in_after_save(tmp_path: Path) -> None:
    seen: dict[int, tuple[str | None, int]] = {}

    class Reader(th.CheckpointSaverListener):
        def after_save(self, session: Any, global_step_value: int) -> None:
            seen[global_step_value] = (
                th.latest_checkpoint(str(tmp_path)),
                ckpt(tmp_path),
            )

    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[Reader()])
    _, mon, train_op = hooked(hook)
    mon.run(train_op)
    mon.run(train_op)
    assert seen == {
        1: (str(tmp_path / "model.ckpt-1"), 1),
        2: (str(tmp_path / "model.ckpt-2"), 2),
    }


def test_max_to_keep_deletes_old_checkpoints_listeners_see_every_save(tmp_path: Path) -> None:
    events: list[Any] = []
    hook = th.CheckpointSaverHook(
        tmp_path, save_steps=1, saver=th.Saver(max_to_keep=2), listeners=[RecordingListener(events)]
    )
    with th.SingularMonitoredSession(
        hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
    ) as sess:
        for _ in range(4):
            sess.run(lambda: None)
    assert [e for e in events if e.startswith("as")] == ["as0", "as1", "as2", "as3", "as4"]
    assert listed_steps(tmp_path) == [3, 4]
    assert sorted(p.name for p in tmp_path.glob("model.ckpt-*")) == ["model.ckpt-3", "model.ckpt-4"]


def test_monitored_training_session_with_stop_at_step(tmp_path: Path) -> None:
    # TF [observed]: save_checkpoint_steps=3 + StopAtStepHook(last_step=10) -> 0,3,6,9,10.
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        state=new_state(),
        save_checkpoint_steps=3,
        save_summaries_steps=None,
        log_step_count_steps=None,
        hooks=[th.StopAtStepHook(last_step=10)],
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    assert listed_steps(tmp_path) == [0, 3, 6, 9, 10]
    assert ckpt(tmp_path) == 10


def test_exception_in_the_loop_means_no_final_save_and_no_listener_end(tmp_path: Path) -> None:
    events: list[Any] = []
    hook = th.CheckpointSaverHook(tmp_path, save_steps=100, listeners=[RecordingListener(events)])

    with (
        pytest.raises(RuntimeError, match="boom at 3"),
        th.SingularMonitoredSession(
            hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
        ) as sess,
    ):
        while True:
            step, _ = sess.run(["global_step", lambda: None])
            if step == 3:
                raise RuntimeError("boom at 3")
    assert events == ["begin", "bs0", "as0"]
    assert ckpt(tmp_path) == 0


def test_end_of_input_saves_the_final_step_and_calls_end(tmp_path: Path) -> None:
    events: list[Any] = []
    hook = th.CheckpointSaverHook(tmp_path, save_steps=100, listeners=[RecordingListener(events)])
    batches = iter(range(3))

    def train_op() -> None:
        try:
            next(batches)
        except StopIteration:
            raise errors.OutOfRangeError("End of sequence") from None

    with th.SingularMonitoredSession(
        hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
    ) as sess:
        while not sess.should_stop():
            sess.run(train_op)
    assert events == ["begin", "bs0", "as0", "bs3", "as3", "end3"]
    assert ckpt(tmp_path) == 3


def test_recovery_resaves_the_restored_step(tmp_path: Path) -> None:
    events: list[Any] = []

    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[RecordingListener(events)])
    creator = th.ChiefSessionCreator(state=new_state(), checkpoint_dir=str(tmp_path))
    with th.MonitoredSession(
        session_creator=creator,
        hooks=[hook, RaiseOnceAtCountN(4, errors.AbortedError("preempted"))],
    ) as sess:
        steps = [sess.run(["global_step", lambda: None])[0] for _ in range(4)]
    assert steps == [1, 2, 3, 4]
    assert events == [
        "begin", "bs0", "as0", "bs1", "as1", "bs2", "as2", "bs3", "as3",
        "bs3", "as3",  # after recovery: restored step 3, saved again
        "bs4", "as4", "end4",
    ]  # fmt: skip
    assert ckpt(tmp_path) == 4


# ---- the listener docstring's "act less often, don't act twice" pattern ---------------


def test_listener_docstring_example_runs() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(checkpoint_module.CheckpointSaverListener):
        runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert runner.summarize(verbose=False).attempted > 0


@pytest.mark.parametrize(("runs", "handled"), [(6, [0, 4, 6]), (8, [0, 4, 8])])
def test_act_less_often_listener_handles_the_last_checkpoint_once(
    tmp_path: Path, runs: int, handled: list[int]
) -> None:
    class ExportEveryN(th.CheckpointSaverListener):
        def __init__(self, every_n_steps: int) -> None:
            self.every_n_steps = every_n_steps
            self.exported: list[int] = []

        def after_save(self, session: Any, global_step_value: int) -> None:
            if global_step_value % self.every_n_steps == 0:
                self.exported.append(global_step_value)

        def end(self, session: Any, global_step_value: int) -> None:
            if not self.exported or self.exported[-1] != global_step_value:
                self.exported.append(global_step_value)

    listener = ExportEveryN(4)
    hook = th.CheckpointSaverHook(tmp_path, save_steps=2, listeners=[listener])
    with th.SingularMonitoredSession(
        hooks=[hook], checkpoint_dir=str(tmp_path), state=new_state()
    ) as sess:
        for _ in range(runs):
            sess.run(lambda: None)
    assert listener.exported == handled
