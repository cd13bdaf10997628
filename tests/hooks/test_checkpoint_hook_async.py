"""CheckpointSaverHook with background saving (docs/internals.md), through real monitored sessions.

Every scenario runs twice, saving synchronously and in the background, and the
listeners must hear the same calls in the same order; each ``after_save`` must find its
checkpoint committed, listed and verified, holding the state as it was when the save
began although training has changed it in place since. A save is held in flight, or
failed, by ``GatedStorage`` (``tests/helpers/storage_doubles.py``): the local disk,
except that the first operation of a save can wait for the test or raise an ``OSError``
as the kernel would.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.checkpoints import new_state
from tests.helpers.hooks import RaiseOnceAtCountN
from tests.helpers.listeners import RecordingListener
from tests.helpers.paths import SRC
from tests.helpers.storage_doubles import GatedStorage

import trainhooks as th
from trainhooks import errors
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saving.directories import wait_for_saves_into
from trainhooks.session.run_hook import SessionRunContext, SessionRunValues

QUIET: dict[str, Any] = {"save_summaries_steps": 0, "log_step_count_steps": 0}


def check_committed(listener: RecordingListener, global_step_value: int) -> None:
    """In ``after_save``, checks the checkpoint as a user would."""
    prefix = listener.hook.last_checkpoint_path
    assert prefix is not None and prefix.endswith(f"model.ckpt-{global_step_value}")
    # Committed and listed, every byte verified ...
    assert th.latest_checkpoint(listener.hook.checkpoint_dir) == prefix
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()
        assert ckpt.global_step == global_step_value
    # ... and holding the state as of the save, not as training has changed it.
    w = th.load_checkpoint(prefix).get_tensor("w")
    np.testing.assert_array_equal(w, np.full_like(w, global_step_value))


def _train(
    directory: Path,
    *,
    async_save: bool,
    save_steps: int,
    last_step: int,
    abort_at: int | None = None,
    stop_at: int | None = None,
) -> tuple[list[str], list[int]]:
    """Train until StopAtStepHook stops; returns the listener's events and the run results."""
    events: list[str] = []
    state = new_state(2**16)
    scaffold = th.Scaffold(state=state)
    hook = th.CheckpointSaverHook(
        str(directory),
        save_steps=save_steps,
        scaffold=scaffold,
        listeners=[RecordingListener(events, stop_at=stop_at, check=check_committed)],
        async_save=async_save,
    )
    hooks: list[th.SessionRunHook] = [th.StopAtStepHook(last_step=last_step)]
    if abort_at is not None:
        hooks.insert(0, RaiseOnceAtCountN(abort_at, errors.AbortedError("preempted")))
    results = []
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(directory),
        scaffold=scaffold,
        chief_only_hooks=[hook],
        hooks=hooks,
        save_checkpoint_steps=0,  # the hook above is the checkpoint hook
        **QUIET,
    ) as sess:
        while not sess.should_stop():
            results.append(sess.run_step_fn(lambda step_context: _one_step(step_context, state)))
    assert scaffold.saver is not None and scaffold.saver.async_save == async_save
    return events, results


def _one_step(step_context: Any, state: dict[str, Any]) -> int:
    def fill() -> None:  # in place: a snapshot taken before must not see it
        state["w"][:] = step_context.session.global_step + 1

    step_context.run_with_hooks(fill)
    return int(step_context.session.global_step)


# ---- the listener protocol is the same as with synchronous saving ----------------------


@pytest.mark.parametrize(
    ("save_steps", "last_step", "abort_at"),
    [
        pytest.param(1, 6, None, id="every-step"),
        pytest.param(3, 10, None, id="every-3-steps-final-save-in-end"),
        pytest.param(1, 6, 4, id="every-step-recovery"),
        pytest.param(3, 10, 5, id="every-3-steps-recovery"),
    ],
)
def test_listener_events_are_the_same_as_with_synchronous_saving(
    tmp_path: Path, save_steps: int, last_step: int, abort_at: int | None
) -> None:
    sync_events, sync_results = _train(
        tmp_path / "sync",
        async_save=False,
        save_steps=save_steps,
        last_step=last_step,
        abort_at=abort_at,
    )
    bg_events, bg_results = _train(
        tmp_path / "async",
        async_save=True,
        save_steps=save_steps,
        last_step=last_step,
        abort_at=abort_at,
    )
    assert bg_events == sync_events
    assert bg_results == sync_results
    assert sync_results[-1] == last_step
    assert sync_events[0] == "begin" and sync_events[-1] == f"end{last_step}"
    if save_steps == 3:  # the final step was saved by end(), then listeners' end
        assert sync_events[-3:] == [f"bs{last_step}", f"as{last_step}", f"end{last_step}"]
    if abort_at is not None:  # the recovered session re-saved the restored step
        restored = abort_at - 1 - (abort_at - 1) % save_steps
        assert sync_events.count(f"bs{restored}") == 2
    for name in ("sync", "async"):
        assert th.latest_checkpoint(str(tmp_path / name)) == str(
            tmp_path / name / f"model.ckpt-{last_step}"
        )


def test_a_stop_requested_in_after_save_stops_training_at_most_one_step_later(
    tmp_path: Path,
) -> None:
    sync_events, sync_results = _train(
        tmp_path / "sync", async_save=False, save_steps=1, last_step=20, stop_at=3
    )
    bg_events, bg_results = _train(
        tmp_path / "async", async_save=True, save_steps=1, last_step=20, stop_at=3
    )
    assert sync_results[-1] == 3
    # The request is delivered at the first step boundary after the commit, and the
    # next save waits for the commit: training stops after step 3 or step 4.
    assert bg_results[-1] in (3, 4)
    assert bg_events[: len(sync_events) - 1] == sync_events[:-1]
    assert bg_events[-1] == f"end{bg_results[-1]}"


# ---- the snapshot, end(), and interpreter exit --------------------------------------------


def _mts(directory: Path, state: dict[str, Any], saver: th.Saver, **kwargs: Any) -> Any:
    return th.MonitoredTrainingSession(
        checkpoint_dir=str(directory),
        scaffold=th.Scaffold(state=state, saver=saver),
        save_checkpoint_steps=kwargs.pop("save_checkpoint_steps", 1),
        async_checkpoint=True,
        **QUIET,
        **kwargs,
    )


def test_end_returns_only_after_the_save_in_flight_committed(tmp_path: Path) -> None:
    storage = GatedStorage()
    state = new_state(2**16)
    events: list[str] = []
    scaffold = th.Scaffold(state=state, saver=th.Saver(async_save=True, storage=storage))
    hook = th.CheckpointSaverHook(
        str(tmp_path),
        save_steps=100,
        scaffold=scaffold,
        listeners=[RecordingListener(events, check=check_committed)],
        async_save=True,
    )
    sess = th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        scaffold=scaffold,
        chief_only_hooks=[hook],
        save_checkpoint_steps=0,
        **QUIET,
    )
    sess.run(lambda: state["w"].fill(1.0))
    sess.run(lambda: state["w"].fill(2.0))
    wait_for_saves_into(str(tmp_path))  # step 0's save is done: hold the next one
    storage.hold = True

    def release_once_held() -> None:
        assert storage.entered.wait(20)
        events.append(f"held {scaffold.saver.pending if scaffold.saver else None}")
        storage.release.set()

    helper = threading.Thread(target=release_once_held)
    helper.start()
    sess.close()  # end(): the final save of step 2 in the background, and waits for it
    events.append("closed")
    helper.join()
    final = str(tmp_path / "model.ckpt-2")
    # after_save (which checks the commit) came before the listeners' end and close.
    assert events == ["begin", "bs0", "as0", "bs2", f"held {final}", "as2", "end2", "closed"]
    assert scaffold.saver is not None and scaffold.saver.pending is None
    assert th.latest_checkpoint(str(tmp_path)) == final


def test_the_snapshot_is_the_state_when_save_returned(tmp_path: Path) -> None:
    storage = GatedStorage()
    state = new_state(2**16)
    saver = th.Saver(async_save=True, storage=storage)
    with _mts(tmp_path, state, saver, save_checkpoint_steps=2) as sess:
        sess.run(lambda: state["w"].fill(1.0))
        wait_for_saves_into(str(tmp_path))  # step 0's save is done: hold the next one
        storage.hold = True
        sess.run(lambda: state["w"].fill(2.0))  # saves step 2; the write is held
        assert storage.entered.wait(20)
        assert saver.pending == str(tmp_path / "model.ckpt-2")
        state["w"].fill(-1.0)  # training changes the state while the save is in flight
        storage.release.set()
        storage.hold = False
        sess.run(lambda: state["w"].fill(3.0))
    np.testing.assert_array_equal(
        th.load_checkpoint(str(tmp_path / "model.ckpt-2")).get_tensor("w"), 2.0
    )
    np.testing.assert_array_equal(th.load_variable(str(tmp_path), "w"), 3.0)


@pytest.mark.slow  # a second process trains and exits mid-save
def test_interpreter_exit_finishes_the_save_in_flight(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        import trainhooks as th
        state = {"w": np.zeros(16 * 2**20, np.float32)}
        scaffold = th.Scaffold(state=state)
        sess = th.MonitoredTrainingSession(
            checkpoint_dir=sys.argv[1], scaffold=scaffold, save_checkpoint_steps=1,
            async_checkpoint=True, save_summaries_steps=0, log_step_count_steps=0,
        )
        sess.run(lambda: state["w"].fill(1.0))
        print("pending", scaffold.saver.pending is not None, flush=True)
        raise SystemExit(0)  # no close(), no end(): the save of step 1 is in flight
        """
    )
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pending True"  # it was still in flight at exit
    listed = th.get_checkpoint_state(str(tmp_path))
    assert listed is not None
    assert listed.model_checkpoint_path == str(tmp_path / "model.ckpt-1")
    for prefix in listed.all_model_checkpoint_paths:
        with open_checkpoint(prefix) as ckpt:
            ckpt.verify()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []
    np.testing.assert_array_equal(th.load_variable(str(tmp_path), "w"), 1.0)


# ---- errors -----------------------------------------------------------------------------------


class StepRecorder(th.SessionRunHook):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.steps.append(run_context.session.global_step)


def test_a_failed_background_save_is_raised_at_the_next_step_boundary(tmp_path: Path) -> None:
    storage = GatedStorage()
    state = new_state(2**16)
    saver = th.Saver(async_save=True, storage=storage)
    recorder = StepRecorder()
    sess = _mts(tmp_path, state, saver, save_checkpoint_steps=3, hooks=[recorder])
    with pytest.raises(OSError) as info, sess:
        for _ in range(2):
            sess.run(lambda: None)
        wait_for_saves_into(str(tmp_path))  # step 0's save is done: hold the next one
        storage.hold = True
        storage.error = OSError(errno.EIO, os.strerror(errno.EIO))
        sess.run(lambda: None)  # step 3: the save starts, and is held
        assert storage.entered.wait(20)
        sess.run(lambda: None)  # step 4: the save has not failed yet
        storage.release.set()
        wait_for_saves_into(str(tmp_path))  # it has failed now; nobody has looked yet
        sess.run(lambda: None)  # step 5's before_run, the next step boundary, raises
    assert info.value.errno == errno.EIO
    assert str(tmp_path / "model.ckpt-3") in str(info.value)
    assert recorder.steps == [1, 2, 3, 4]  # step 5 never ran
    # An error exit: no end(), no final save; the listed checkpoint is untouched.
    listed = th.get_checkpoint_state(str(tmp_path))
    assert listed is not None
    assert listed.all_model_checkpoint_paths == [str(tmp_path / "model.ckpt-0")]
    with open_checkpoint(str(tmp_path / "model.ckpt-0")) as ckpt:
        ckpt.verify()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_on_save_error_log_keeps_training_and_the_listed_checkpoints(
    tmp_path: Path, async_save: bool, caplog: pytest.LogCaptureFixture
) -> None:
    storage = GatedStorage()
    state = new_state(2**16)
    events: list[str] = []
    saver = th.Saver(async_save=async_save, storage=storage, max_to_keep=2)
    hook = th.CheckpointSaverHook(
        str(tmp_path),
        save_steps=1,
        saver=saver,
        listeners=[RecordingListener(events, check=check_committed)],
        on_save_error="log",
    )
    with (
        caplog.at_level(logging.ERROR, logger="trainhooks.hooks.checkpoint"),
        th.SingularMonitoredSession(hooks=[hook], state=state) as sess,
    ):
        sess.run(lambda: state["w"].fill(1.0))
        wait_for_saves_into(str(tmp_path))  # step 1's save is done: fail the next ones
        storage.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        sess.run(lambda: state["w"].fill(2.0))
        sess.run(lambda: state["w"].fill(3.0))
        wait_for_saves_into(str(tmp_path))  # step 3's save has failed too
        listed = th.get_checkpoint_state(str(tmp_path))
        assert listed is not None
        assert listed.all_model_checkpoint_paths == [
            str(tmp_path / "model.ckpt-0"),
            str(tmp_path / "model.ckpt-1"),
        ]
        storage.error = None  # space comes back
        sess.run(lambda: state["w"].fill(4.0))
    # Failed saves get no after_save; the sequence is the same with either saver.
    assert events == ["begin", "bs0", "as0", "bs1", "as1", "bs2", "bs3", "bs4", "as4", "end4"]
    assert "No space left on device" in caplog.text
    assert str(tmp_path / "model.ckpt-2") in caplog.text
    assert "training continues" in caplog.text
    listed = th.get_checkpoint_state(str(tmp_path))
    assert listed is not None
    assert listed.all_model_checkpoint_paths == [
        str(tmp_path / "model.ckpt-1"),
        str(tmp_path / "model.ckpt-4"),
    ]
    for prefix in listed.all_model_checkpoint_paths:
        with open_checkpoint(prefix) as ckpt:
            ckpt.verify()


# ---- which saver saves in the background -------------------------------------------------------


def test_async_save_with_a_synchronous_saver_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"saves synchronously: pass saver=Saver\(.*async_save"):
        th.CheckpointSaverHook(tmp_path, save_steps=1, saver=th.Saver(), async_save=True)
    with pytest.raises(ValueError, match=r"Scaffold\(saver=Saver\(async_save=True\)\)"):
        th.CheckpointSaverHook(
            tmp_path, save_steps=1, scaffold=th.Scaffold(saver=th.Saver()), async_save=True
        )
    finalized = th.Scaffold(state={"w": np.zeros(1)}).finalize()
    with pytest.raises(ValueError, match="created by finalize"):
        th.CheckpointSaverHook(tmp_path, save_steps=1, scaffold=finalized, async_save=True)
    with pytest.raises(ValueError, match="on_save_error must be 'raise' or 'log'"):
        th.CheckpointSaverHook(tmp_path, save_steps=1, on_save_error="ignore")  # type: ignore[arg-type]


def test_the_hook_and_the_session_choose_the_saver_that_saves_in_the_background(
    tmp_path: Path,
) -> None:
    assert th.CheckpointSaverHook(tmp_path, save_steps=1, async_save=True).saver.async_save
    assert not th.CheckpointSaverHook(tmp_path, save_steps=1).saver.async_save
    # A user's saver keeps its own setting.
    own = th.Saver(async_save=True)
    assert th.CheckpointSaverHook(tmp_path, save_steps=1, saver=own).saver is own
    # MonitoredTrainingSession(async_checkpoint=True) makes the scaffold's saver async.
    scaffold = th.Scaffold(state={"w": np.zeros(3)})
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        scaffold=scaffold,
        save_checkpoint_steps=1,
        async_checkpoint=True,
        **QUIET,
    ) as sess:
        sess.run(lambda: None)
    assert scaffold.saver is not None and scaffold.saver.async_save
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-1")


def test_a_users_background_saver_is_delivered_at_step_boundaries(tmp_path: Path) -> None:
    storage = GatedStorage()
    events: list[str] = []
    state = new_state(2**16)
    saver = th.Saver(async_save=True, storage=storage)
    hook = th.CheckpointSaverHook(
        str(tmp_path),
        save_steps=1,
        saver=saver,
        listeners=[RecordingListener(events, check=check_committed)],
    )
    storage.hold = True
    with th.SingularMonitoredSession(hooks=[hook], state=state) as sess:
        # after_create_session's save of step 0 is held: after_save has not run.
        assert storage.entered.wait(20)
        assert events == ["begin", "bs0"]
        storage.hold = False
        storage.release.set()
        sess.run(lambda: state["w"].fill(1.0))  # delivered at this step's boundary
        assert events[:3] == ["begin", "bs0", "as0"]
    assert events == ["begin", "bs0", "as0", "bs1", "as1", "end1"]
