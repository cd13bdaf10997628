"""Preemption: SIGTERM stops training at the next step boundary with a final checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.paths import PROGRAMS

import trainhooks as th
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.preemption import PreemptedError, PreemptionWatcher
from trainhooks.session.session import Session

sys.path.insert(0, str(PROGRAMS))  # tests/_programs/*.py are imported by name

import train_loop

PROGRAM = train_loop.__file__


def _mts(tmp_path: Path, **kwargs: Any) -> Any:
    kwargs.setdefault("save_checkpoint_steps", 1000)
    return th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        save_summaries_steps=0,
        log_step_count_steps=0,
        **kwargs,
    )


def _restored_step(tmp_path: Path) -> int:
    sess = Session({"w": np.zeros(3)})
    Saver().restore(sess, th.latest_checkpoint(str(tmp_path)))
    return sess.global_step


# ---- in this process ---------------------------------------------------------------


def test_sigterm_mid_step_stops_after_that_step_and_saves_it(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    state = {"w": np.zeros(3)}
    ran = []

    def step() -> None:
        state["w"] += 1
        ran.append(len(ran) + 1)
        if len(ran) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 3 runs

    with _mts(tmp_path, state=state) as sess:
        assert signal.getsignal(signal.SIGTERM) != before
        while not sess.should_stop():
            sess.run(step)
    assert ran == [1, 2, 3]
    assert _restored_step(tmp_path) == 3
    assert signal.getsignal(signal.SIGTERM) == before


def test_run_after_the_signal_is_a_clean_stop_and_end_runs(tmp_path: Path) -> None:
    ended = []

    class End(th.SessionRunHook):
        def end(self, session: Any) -> None:
            ended.append(session.global_step)

    state = {"w": np.zeros(3)}
    with _mts(tmp_path, state=state, hooks=[End()]) as sess:
        sess.run(lambda: None)
        sess.preemption.request_stop(signal.SIGTERM)
        with pytest.raises(PreemptedError, match="SIGTERM") as info:
            sess.run(lambda: None)  # a loop that ignores should_stop
        assert info.value.signum == signal.SIGTERM
        raise info.value  # inside `with`: a clean stop, like OutOfRangeError
    assert ended == [1]
    assert _restored_step(tmp_path) == 1


def test_other_signals_can_be_named_and_handlers_are_restored(tmp_path: Path) -> None:
    calls: list[int] = []

    def user_handler(signum: int, frame: Any) -> None:
        calls.append(signum)

    previous = signal.signal(signal.SIGUSR1, user_handler)
    try:
        with _mts(
            tmp_path,
            state={"w": np.zeros(3)},
            preemption_signals=[signal.SIGTERM, signal.SIGUSR1],
        ) as sess:
            sess.run(lambda: os.kill(os.getpid(), signal.SIGUSR1))
            assert sess.should_stop()
        assert calls == []  # ours handled it while the session was open
        assert signal.getsignal(signal.SIGUSR1) is user_handler
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert _restored_step(tmp_path) == 1


def test_preemption_off_leaves_handlers_alone(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with _mts(tmp_path, state={"w": np.zeros(3)}, preemption_signals=None) as sess:
        assert sess.preemption is None
        assert signal.getsignal(signal.SIGTERM) == before


def test_not_in_main_thread_warns_and_trains_normally(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = signal.getsignal(signal.SIGTERM)
    result: list[Any] = []

    def train() -> None:
        try:
            with _mts(tmp_path, state={"w": np.zeros(3)}) as sess:
                result.append(signal.getsignal(signal.SIGTERM))
                sess.run(lambda: None)
        except BaseException as e:
            result.append(e)

    with caplog.at_level(logging.WARNING, logger="trainhooks.session.preemption"):
        thread = threading.Thread(target=train)
        thread.start()
        thread.join()
    assert result == [before]
    assert "Not in the main thread" in caplog.text
    assert _restored_step(tmp_path) == 1


def test_worker_stops_cleanly_too(tmp_path: Path) -> None:
    with th.MonitoredTrainingSession(is_chief=False, state={"w": np.zeros(3)}) as sess:
        sess.run(lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert sess.should_stop()
        with pytest.raises(PreemptedError):
            sess.run(lambda: None)
    assert not sess.preemption.installed


def test_signal_during_session_creation_stops_before_the_first_step(tmp_path: Path) -> None:
    class KillOnCreate(th.SessionRunHook):
        def after_create_session(self, session: Any, coord: Any) -> None:
            os.kill(os.getpid(), signal.SIGTERM)

    ran = []
    with _mts(tmp_path, state={"w": np.zeros(3)}, hooks=[KillOnCreate()]) as sess:
        while not sess.should_stop():
            sess.run(lambda: ran.append(1))
    assert ran == []
    assert _restored_step(tmp_path) == 0


def test_grace_period_expiry_calls_the_action_with_the_signal() -> None:
    expired: list[int] = []
    done = threading.Event()

    def on_expired(signum: int) -> None:
        expired.append(signum)
        done.set()

    watcher = PreemptionWatcher(grace_period_secs=0.0, on_grace_expired=on_expired)
    assert watcher.install()
    try:
        watcher.request_stop(signal.SIGTERM)
        assert done.wait(30)
    finally:
        watcher.uninstall()
    assert expired == [signal.SIGTERM]


def test_closing_in_time_cancels_the_grace_period_and_a_second_signal_exits_now() -> None:
    expired: list[int] = []
    watcher = PreemptionWatcher(grace_period_secs=3600, on_grace_expired=expired.append)
    watcher.install()
    watcher.request_stop(signal.SIGTERM)
    watcher.request_stop(signal.SIGTERM)  # an impatient operator: exit now
    assert expired == [signal.SIGTERM]
    watcher.uninstall()
    assert watcher._watchdog is not None
    watcher._watchdog.join(30)
    assert not watcher._watchdog.is_alive()
    assert expired == [signal.SIGTERM]  # the watchdog did not fire as well


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="SIGTERM"):
        PreemptionWatcher(signals=[signal.SIGKILL])
    with pytest.raises(ValueError, match="grace_period_secs"):
        PreemptionWatcher(grace_period_secs=-1)


# ---- a real training process ---------------------------------------------------------


def _start(directory: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, PROGRAM, str(directory), "--mode", "mts", "--save-steps", "1000", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # a real process gets SIGTERM
def test_sigterm_to_a_real_process_saves_the_last_completed_step(tmp_path: Path) -> None:
    with _start(tmp_path, "--step-secs", "0.01") as proc:
        assert proc.stdout is not None
        lines = [proc.stdout.readline()]
        while not lines[-1].startswith("step 5"):
            assert lines[-1], proc.communicate()[1]
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    lines += out.splitlines()
    assert proc.returncode == 0, err
    steps = [int(line.split()[1]) for line in lines if line.startswith("step ")]
    last = steps[-1]
    assert last >= 5
    assert lines[-3:] == [f"end {last}", "closed", "handler restored"]
    assert "Received SIGTERM" in err
    # The final checkpoint (saved by end(): save_steps is 1000) holds the last step, bit-exact.
    state = train_loop.initial_state()
    sess = Session(state)
    assert Saver().restore_latest(sess, str(tmp_path)) == str(tmp_path / f"model.ckpt-{last}")
    expected = train_loop.state_at(last)
    assert state["w"].tobytes() == expected["w"].tobytes()
    assert state["v"].tobytes() == expected["v"].tobytes()
    assert state["meta"] == expected["meta"]


@pytest.mark.slow  # a real process, killed after its grace period
def test_a_hung_step_ends_the_process_after_the_grace_period(tmp_path: Path) -> None:
    with _start(tmp_path, "--hang-at", "3", "--grace", "0.5") as proc:
        assert proc.stdout is not None
        while not proc.stdout.readline().startswith("hanging"):
            pass
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "did not stop within 0.5 s" in err
    # Nothing was saved mid-step; the checkpoint listed (step 0) is intact.
    assert _restored_step_loop(tmp_path) == 0


def _restored_step_loop(directory: Path) -> int:
    sess = Session(train_loop.initial_state())
    Saver().restore_latest(sess, str(directory))
    return sess.global_step
