"""Monitored sessions with real checkpoints: restore, recovery, the default chief hooks
(ported from TF's monitored_session_test.py; uses Saver and CheckpointSaverHook)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.helpers.checkpoints import listed_steps, new_state
from tests.helpers.hooks import CountingHook, RaiseOnceAtCountN
from tests.helpers.listeners import RecordingListener

import trainhooks as th
from trainhooks import errors
from trainhooks.checkpoint.management.state_file import latest_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.hooks.basic import StepCounterHook, StopAtStepHook
from trainhooks.hooks.checkpoint import CheckpointSaverHook
from trainhooks.hooks.summary import SummarySaverHook
from trainhooks.session.creators import ChiefSessionCreator, Scaffold
from trainhooks.session.monitored import (
    MonitoredSession,
    SingularMonitoredSession,
)
from trainhooks.session.session import Session
from trainhooks.training import MonitoredTrainingSession


def train_step(state: dict[str, Any]) -> Any:
    def step() -> dict[str, float]:
        state["w"] += 1.0
        return {"loss": float(state["w"].sum())}

    return step


def test_saving_restoring_checkpoint(tmp_path: Path) -> None:
    state = new_state(count=0)
    with MonitoredTrainingSession(checkpoint_dir=str(tmp_path), state=state) as session:
        assert session.run("global_step") == 1
        assert session.run([train_step(state), "global_step"])[1] == 2
    # A restart finds the checkpoint that end() wrote and restores it.
    state2 = new_state(count=0)
    with MonitoredTrainingSession(checkpoint_dir=str(tmp_path), state=state2) as session:
        assert session.run("global_step") == 3
    assert state2["w"].tolist() == [1.0, 1.0, 1.0]


def test_custom_saving_with_checkpoints_off(tmp_path: Path) -> None:
    hook = CountingHook()
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        chief_only_hooks=[hook],
        save_checkpoint_secs=0,
        state=new_state(count=0),
    ) as session:
        assert session.run("global_step") == 1
    assert hook.count("begin") == 1
    assert not (tmp_path / "checkpoint").exists()
    # A restart finds no checkpoint, since nothing was saved.
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path), state=new_state(count=0)
    ) as session:
        assert session.run("global_step") == 1


def test_default_chief_hooks_and_their_order(tmp_path: Path) -> None:
    chief_hook, user_hook = CountingHook(), CountingHook()
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        chief_only_hooks=[chief_hook],
        hooks=[user_hook],
        state=new_state(count=0),
    ) as session:
        hooks = session._hooks
        # The checkpoint at the creation step is already there.
        assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-0")
    assert [type(h) for h in hooks] == [
        CountingHook,
        StepCounterHook,
        SummarySaverHook,
        CheckpointSaverHook,
        CountingHook,
    ]
    assert hooks[0] is chief_hook and hooks[-1] is user_hook
    assert hooks[2]._timer._every_steps == 100  # type: ignore[attr-defined]
    assert hooks[3]._timer._every_secs == 600  # type: ignore[attr-defined]
    assert hooks[3].checkpoint_dir == str(tmp_path)  # type: ignore[attr-defined]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_summary_dir_takes_the_summaries(tmp_path: Path) -> None:
    summaries = tmp_path / "summaries"
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path / "ckpt"), summary_dir=str(summaries), state=new_state(count=0)
    ) as session:
        session.run(lambda: None)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(summaries))
    assert not any(n.startswith("events") for n in os.listdir(tmp_path / "ckpt"))


def test_both_checkpoint_schedules_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=re.escape("Can not provide both every_secs and every_steps.")
    ):
        MonitoredTrainingSession(
            checkpoint_dir=str(tmp_path),
            save_checkpoint_secs=10,
            save_checkpoint_steps=10,
            state=new_state(count=0),
        )


def test_checkpoint_every_3_steps_with_stop_at_10(tmp_path: Path) -> None:
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        save_checkpoint_steps=3,
        hooks=[StopAtStepHook(last_step=10)],
        state=new_state(count=0),
    ) as session:
        while not session.should_stop():
            session.run(lambda: None)
    assert listed_steps(tmp_path) == [0, 3, 6, 9, 10]


def test_last_step(tmp_path: Path) -> None:
    state = new_state(count=0)
    hooks = [StopAtStepHook(last_step=3)]
    creator = ChiefSessionCreator(checkpoint_dir=str(tmp_path), state=state)
    with MonitoredSession(session_creator=creator, hooks=hooks) as session:
        assert session.run("global_step") == 1
        assert not session.should_stop()
        assert session.run("global_step") == 2
        assert not session.should_stop()
        assert session.run("global_step") == 3
        assert session.should_stop()
        raw = session._tf_sess()
        assert raw is not None
        save_path = Saver().save(raw, str(tmp_path / "step-3"))
    assert save_path is not None

    # Run to step 5, restoring step 3 in init_fn.
    def load_ckpt(scaffold: Scaffold, sess: Session) -> None:
        assert scaffold.saver is not None
        scaffold.saver.restore(sess, save_path)

    creator = ChiefSessionCreator(Scaffold(init_fn=load_ckpt, state=new_state(count=0)))
    with MonitoredSession(session_creator=creator, hooks=[StopAtStepHook(last_step=5)]) as session:
        assert session.run("global_step") == 4
        assert not session.should_stop()
        assert session.run("global_step") == 5
        assert session.should_stop()


def test_num_steps_after_restore(tmp_path: Path) -> None:
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path), hooks=[StopAtStepHook(num_steps=3)], state=new_state(count=0)
    ) as session:
        steps = []
        while not session.should_stop():
            steps.append(session.run("global_step"))
    assert steps == [1, 2, 3]
    # Restored at 3, num_steps=4 counts from there: stops at 7.
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path), hooks=[StopAtStepHook(num_steps=4)], state=new_state(count=0)
    ) as session:
        steps = []
        while not session.should_stop():
            steps.append(session.run("global_step"))
    assert steps == [4, 5, 6, 7]


def test_recovery(tmp_path: Path) -> None:
    state = new_state(count=0)
    scaffold = Scaffold(state=state)
    hooks = [CheckpointSaverHook(str(tmp_path), save_steps=1, scaffold=scaffold)]
    creator = ChiefSessionCreator(scaffold, checkpoint_dir=str(tmp_path))
    with MonitoredSession(session_creator=creator, hooks=hooks) as session:
        assert session.run([train_step(state), "global_step"])[1] == 1
        assert session.run([train_step(state), "global_step"])[1] == 2
    # A restart finds the checkpoint and restores it.
    state["w"][:] = -1.0
    with MonitoredSession(ChiefSessionCreator(scaffold, checkpoint_dir=str(tmp_path))) as session:
        assert session.run("global_step") == 3
        assert state["w"].tolist() == [2.0, 2.0, 2.0]
    state["w"][:] = -1.0
    path = latest_checkpoint(str(tmp_path))
    assert path == str(tmp_path / "model.ckpt-2")
    creator = ChiefSessionCreator(scaffold, checkpoint_filename_with_path=path)
    with MonitoredSession(creator) as session:
        assert session.run("global_step") == 3
        assert state["w"].tolist() == [2.0, 2.0, 2.0]


def test_recover_and_retry_on_aborted_error(tmp_path: Path) -> None:
    state = new_state(count=0)
    scaffold = Scaffold(state=state)
    listener = RecordingListener()
    abort_hook = RaiseOnceAtCountN(4, errors.AbortedError("Abort"))
    ckpt_hook = CheckpointSaverHook(
        str(tmp_path), save_steps=1, scaffold=scaffold, listeners=[listener]
    )
    creator = ChiefSessionCreator(scaffold, checkpoint_dir=str(tmp_path))
    with MonitoredSession(session_creator=creator, hooks=[abort_hook, ckpt_hook]) as session:
        assert session.run("global_step") == 1
        assert session.run("global_step") == 2
        assert session.run("global_step") == 3
        assert not session.should_stop()
        # The 4th run aborts in before_run: the session restores step 3 and retries.
        assert session.run("global_step") == 4
        assert abort_hook.raised
        assert not session.should_stop()
        assert session.run("global_step") == 5
    assert listener.events == [
        "begin",
        *("bs0", "as0", "bs1", "as1", "bs2", "as2", "bs3", "as3"),
        *("bs3", "as3"),  # the re-save at the restored step after recovery
        *("bs4", "as4", "bs5", "as5"),
        "end5",
    ]


def test_recovery_restores_the_state_changed_by_the_failed_step(tmp_path: Path) -> None:
    state = new_state(count=0)
    abort_hook = RaiseOnceAtCountN(3, errors.UnavailableError("peer gone"), in_after_run=True)
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        save_checkpoint_steps=1,
        # after_run of the abort hook runs before the checkpoint hook's: no save at 3.
        chief_only_hooks=[abort_hook],
        state=state,
    ) as session:
        assert session.run([train_step(state), "global_step"])[1] == 1
        assert session.run([train_step(state), "global_step"])[1] == 2
        # The 3rd step changes w, then fails: w is restored from step 2 and the
        # step runs again.
        assert session.run([train_step(state), "global_step"])[1] == 3
        assert state["w"].tolist() == [3.0, 3.0, 3.0]
    assert abort_hook.raised


def test_restore_torch_state_on_a_second_session(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 4)

    def step() -> dict[str, float]:
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}

    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        hooks=[StopAtStepHook(last_step=3)],
        state={"model": model, "optimizer": optimizer},
    ) as session:
        while not session.should_stop():
            session.run(step)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = torch.nn.Linear(4, 2)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    with SingularMonitoredSession(
        checkpoint_dir=str(tmp_path), state={"model": model2, "optimizer": optimizer2}
    ) as session:
        raw = session.raw_session()
        assert raw is not None and raw.global_step == 3
    for name, value in model2.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert optimizer2.state_dict()["state"].keys() == optimizer.state_dict()["state"].keys()


def test_worker_restores_the_chief_checkpoint_and_writes_nothing(tmp_path: Path) -> None:
    state = new_state(count=0)
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path), state=state, save_checkpoint_steps=1
    ) as session:
        session.run(train_step(state))
        session.run(train_step(state))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    worker_state = new_state(count=0)
    with MonitoredTrainingSession(
        is_chief=False, checkpoint_dir=str(tmp_path), state=worker_state
    ) as session:
        assert session.run("global_step") == 3
        assert worker_state["w"].tolist() == [2.0, 2.0, 2.0]
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_restart_falls_back_when_the_latest_checkpoint_is_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = new_state(count=0)
    with MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path), state=state, save_checkpoint_steps=1
    ) as session:
        session.run(train_step(state))
        session.run(train_step(state))
    (data_file,) = (tmp_path / "model.ckpt-2").glob("*.safetensors")
    raw = bytearray(data_file.read_bytes())
    raw[-1] ^= 0xFF  # flip bits in the last tensor byte
    data_file.write_bytes(bytes(raw))

    state2 = new_state(count=0)
    with (
        caplog.at_level("WARNING"),
        SingularMonitoredSession(checkpoint_dir=str(tmp_path), state=state2) as session,
    ):
        raw_session = session.raw_session()
        assert raw_session is not None and raw_session.global_step == 1
    assert state2["w"].tolist() == [1.0, 1.0, 1.0]
    assert "model.ckpt-2" in caplog.text


@pytest.mark.slow  # a second process trains in the same directory
def test_an_error_exit_releases_the_directory_for_another_process(tmp_path: Path) -> None:
    """After a training loop dies with an exception (no hooks' end), the scaffold's saver
    and the session release the writer lock, so a restarted process can save there."""
    import subprocess
    import sys

    state = {"w": np.zeros(3, np.float32)}
    with (
        pytest.raises(ZeroDivisionError),
        th.MonitoredTrainingSession(
            state=state, checkpoint_dir=str(tmp_path), save_checkpoint_steps=1
        ) as sess,
    ):
        sess.run(lambda: None)
        sess.run(lambda: 1 / 0)
    child = (
        "import sys, numpy as np, trainhooks as th\n"
        "with th.MonitoredTrainingSession(state={'w': np.zeros(3, np.float32)},"
        " checkpoint_dir=sys.argv[1], save_checkpoint_steps=1) as s:\n"
        "    s.run(lambda: None)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert th.load_variable(str(tmp_path), "global_step") == 2
