"""Every public entry point on ``s3://`` paths, against a real local S3 server.

A training session checkpoints to S3 and a second one resumes from it; the readers,
the state file functions, a listener's backup directory and the command line all take
the same ``s3://`` paths as local ones.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import trainhooks as th
from trainhooks.checkpoint.storage import storage_for
from trainhooks.cli import main


def _train(run: str, steps: int, **kwargs: object) -> dict[str, np.ndarray]:
    state = {"w": np.zeros(32, np.float32), "b": np.arange(4, dtype=np.int64)}

    def step() -> None:
        state["w"] += 1.0
        state["b"] *= 2

    with th.MonitoredTrainingSession(
        checkpoint_dir=run,
        state=state,
        save_checkpoint_steps=1,
        save_summaries_steps=0,
        log_step_count_steps=0,
        hooks=[th.StopAtStepHook(last_step=steps)],
        **kwargs,
    ) as sess:
        while not sess.should_stop():
            sess.run(step)
    return state


def test_a_session_checkpoints_to_s3_and_the_next_resumes_from_it(s3_bucket: str) -> None:
    run = f"{s3_bucket}/run"
    _train(run, 3)
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-3"
    state = _train(run, 5)  # restores step 3, trains two more
    np.testing.assert_array_equal(state["w"], np.full(32, 5, np.float32))
    np.testing.assert_array_equal(state["b"], np.arange(4) * 32)
    ckpt = th.get_checkpoint_state(run)
    assert ckpt is not None
    assert ckpt.model_checkpoint_path == f"{run}/model.ckpt-5"
    # The state file is TensorFlow's text format, as on a local disk.
    text = storage_for(run).read_bytes(f"{run}/checkpoint", max_bytes=10_000).decode()
    assert text.startswith(f'model_checkpoint_path: "{run}/model.ckpt-5"\n')
    assert dict(th.list_variables(run))["w"] == [32]
    np.testing.assert_array_equal(th.load_variable(run, "w"), np.full(32, 5, np.float32))
    reader = th.load_checkpoint(run)
    assert reader.get_tensor("b").tolist() == [0, 32, 64, 96]


def test_latest_checkpoint_falls_back_to_listing_when_the_state_file_is_stale(
    s3_bucket: str,
) -> None:
    run = f"{s3_bucket}/run"
    saver = th.Saver(max_to_keep=5)
    sess = th.Session({"w": np.zeros(4)})
    for step in (1, 2):
        saver.save(sess, f"{run}/model.ckpt", global_step=step)
    saver.close()
    th.remove_checkpoint(f"{run}/model.ckpt-2")  # the state file still names it
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-1"
    sess.state["w"][:] = 7
    assert th.Saver().restore_latest(sess, run) == f"{run}/model.ckpt-1"
    np.testing.assert_array_equal(sess.state["w"], np.zeros(4))


def test_a_backup_listener_copies_each_checkpoint_to_s3(s3_bucket: str, tmp_path: object) -> None:
    backup = f"{s3_bucket}/backup"
    state = {"w": np.zeros(8, np.float32)}
    hook = th.CheckpointSaverHook(
        str(tmp_path), save_steps=1, listeners=[th.BackupListener(backup)]
    )
    with th.MonitoredTrainingSession(
        state=state, hooks=[hook, th.StopAtStepHook(last_step=2)], save_summaries_steps=0
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: state["w"].__iadd__(1.0))
    assert th.latest_checkpoint(backup) == f"{backup}/model.ckpt-2"
    np.testing.assert_array_equal(th.load_variable(backup, "w"), np.full(8, 2, np.float32))


def test_the_command_line_lists_inspects_and_verifies_s3_checkpoints(
    s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run = f"{s3_bucket}/run"
    _train(run, 2)
    assert main(["list", "--json", run]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(c["prefix"], c["global_step"], c["status"]) for c in report["checkpoints"]] == [
        (f"{run}/model.ckpt-{step}", step, "ok") for step in (0, 1, 2)
    ]
    assert all(c["bytes"] > 0 for c in report["checkpoints"])
    assert main(["inspect", run]) == 0
    assert "w" in capsys.readouterr().out
    assert main(["verify", run]) == 0
