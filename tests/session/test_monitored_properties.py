"""What a monitored session tells the program: its global step, and whether a signal stopped it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

import trainhooks as th


def test_global_step_is_read_only_and_outlives_the_session(tmp_path: Path) -> None:
    state = {"w": np.zeros(3)}
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path), state=state, hooks=[th.StopAtStepHook(last_step=4)]
    ) as sess:
        assert sess.global_step == 0
        while not sess.should_stop():
            sess.run(lambda: None)
        with pytest.raises(AttributeError):
            sess.global_step = 10  # type: ignore[misc]
    assert sess.global_step == 4
    with th.MonitoredTrainingSession(checkpoint_dir=str(tmp_path), state=state) as again:
        assert again.global_step == 4  # the restored step, before any run


def test_preempted_tells_a_signal_from_a_finished_run(tmp_path: Path) -> None:
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path / "done"),
        state={"w": np.zeros(3)},
        hooks=[th.StopAtStepHook(last_step=2)],
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    assert sess.preempted is False

    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path / "cut"),
        state={"w": np.zeros(3)},
        hooks=[th.StopAtStepHook(last_step=100)],
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
            if sess.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)
    assert sess.preempted is True
    assert sess.global_step == 3
    assert th.latest_checkpoint(str(tmp_path / "cut")).endswith("model.ckpt-3")


def test_exit_on_preemption_raises_system_exit_after_the_clean_close(tmp_path: Path) -> None:
    with (
        pytest.raises(SystemExit) as info,
        th.MonitoredTrainingSession(
            checkpoint_dir=str(tmp_path),
            state={"w": np.zeros(3)},
            exit_on_preemption=True,
        ) as sess,
    ):
        sess.run(lambda: None)
        os.kill(os.getpid(), signal.SIGTERM)
        while not sess.should_stop():
            sess.run(lambda: None)
    assert info.value.code == 128 + signal.SIGTERM
    assert th.latest_checkpoint(str(tmp_path)).endswith("model.ckpt-1")


def test_asking_for_summaries_with_nothing_to_summarize_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with th.MonitoredTrainingSession(checkpoint_dir=str(tmp_path / "a"), state={}) as sess:
        sess.run(lambda: None)
    assert "nothing to summarize" not in caplog.text  # the default: no warning
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path / "b"), state={}, save_summaries_steps=10
    ) as sess:
        sess.run(lambda: None)
    assert "nothing to summarize" in caplog.text
    caplog.clear()
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path / "c"),
        scaffold=th.Scaffold(summary_op={"loss": "loss"}),
        state={},
        save_summaries_steps=10,
    ) as sess:
        sess.run(lambda: {"loss": 1.0})
    assert "nothing to summarize" not in caplog.text
