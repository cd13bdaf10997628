"""BackupListener, EvaluationListener and KeepBestListener on real checkpoint directories."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.checkpoints import new_state

import trainhooks as th
from trainhooks.session.hooked import HookedSession
from trainhooks.session.session import Session


def train(
    checkpoint_dir: Path,
    listeners: list[th.CheckpointSaverListener],
    runs: int,
    *,
    save_steps: int = 1,
    saver: th.Saver | None = None,
) -> tuple[Session, HookedSession, th.CheckpointSaverHook]:
    """A hook saving every ``save_steps``: creation save, ``runs`` steps (w += 1 each), end."""
    hook = th.CheckpointSaverHook(
        checkpoint_dir, save_steps=save_steps, saver=saver, listeners=listeners
    )
    hook.begin()
    sess = Session(new_state())
    mon = HookedSession(sess, [hook])
    hook.after_create_session(sess, th.Coordinator())

    def train_op() -> None:
        sess.state["w"] += 1

    for _ in range(runs):
        if mon.should_stop():
            break
        mon.run(train_op)
    hook.end(sess)
    return sess, mon, hook


def restore(prefix: str | None) -> Session:
    assert prefix is not None
    sess = Session(new_state())
    th.Saver().restore(sess, prefix)
    return sess


def listed(directory: Path) -> list[str]:
    state = th.get_checkpoint_state(str(directory))
    assert state is not None
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths]


def checkpoint_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and ".ckpt-" in p.name)


def same_files(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)


# ---- BackupListener ------------------------------------------------------------------


def test_backup_follows_the_primary_retention(tmp_path: Path) -> None:
    primary, backup = tmp_path / "ckpt", tmp_path / "backup"
    train(primary, [th.BackupListener(backup)], runs=3, saver=th.Saver(max_to_keep=2))
    assert listed(backup) == listed(primary) == ["model.ckpt-2", "model.ckpt-3"]
    assert checkpoint_names(backup) == ["model.ckpt-2", "model.ckpt-3"]
    for name in checkpoint_names(backup):
        assert same_files(primary / name, backup / name)
    assert th.latest_checkpoint(str(backup)) == str(backup / "model.ckpt-3")
    restored = restore(th.latest_checkpoint(str(backup)))
    assert restored.global_step == 3
    np.testing.assert_array_equal(restored.state["w"], np.full(3, 3, np.float32))


def test_backup_keep_all_keeps_every_checkpoint(tmp_path: Path) -> None:
    primary, backup = tmp_path / "ckpt", tmp_path / "backup"
    train(
        primary, [th.BackupListener(backup, keep_all=True)], runs=3, saver=th.Saver(max_to_keep=1)
    )
    expected = [f"model.ckpt-{s}" for s in range(4)]
    assert checkpoint_names(primary) == ["model.ckpt-3"]
    assert listed(backup) == expected
    assert checkpoint_names(backup) == expected
    assert restore(str(backup / "model.ckpt-1")).global_step == 1


def test_backup_survives_losing_the_primary(tmp_path: Path) -> None:
    primary, backup = tmp_path / "ckpt", tmp_path / "backup"
    train(primary, [th.BackupListener(backup)], runs=2)
    for path in primary.iterdir():
        if path.is_dir():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()
        else:
            path.unlink()
    with th.SingularMonitoredSession(checkpoint_dir=str(backup), state=new_state()) as sess:
        raw = sess.raw_session()
        assert raw is not None and raw.global_step == 2
        np.testing.assert_array_equal(raw.state["w"], np.full(3, 2, np.float32))


def test_backup_replaces_a_resaved_step_and_cleans_crash_leftovers(tmp_path: Path) -> None:
    primary, backup = tmp_path / "ckpt", tmp_path / "backup"
    backup.mkdir()
    (backup / "model.ckpt-7.partial-0123").mkdir()  # a copy a crash interrupted
    (backup / "model.ckpt-7.partial-0123" / "manifest.json").write_text("{")
    listener = th.BackupListener(backup)
    sess, _, hook = train(primary, [listener], runs=1)
    hook.after_create_session(sess, th.Coordinator())  # re-saves step 1, as after a recovery
    assert sorted(p.name for p in backup.iterdir()) == [
        "checkpoint",
        "model.ckpt-0",
        "model.ckpt-1",
    ]
    assert listed(backup) == ["model.ckpt-0", "model.ckpt-1"]
    assert same_files(primary / "model.ckpt-1", backup / "model.ckpt-1")


def test_backup_puts_back_a_copy_moved_aside_by_a_crash(tmp_path: Path) -> None:
    primary, backup = tmp_path / "ckpt", tmp_path / "backup"
    listener = th.BackupListener(backup)
    train(primary, [listener], runs=1)
    os.rename(backup / "model.ckpt-1", backup / "model.ckpt-1.replaced-abcd")
    th.BackupListener(backup).begin()
    assert sorted(p.name for p in backup.iterdir()) == [
        "checkpoint",
        "model.ckpt-0",
        "model.ckpt-1",
    ]
    assert restore(th.latest_checkpoint(str(backup))).global_step == 1


def test_listener_outside_a_hook_says_how_to_attach_it(tmp_path: Path) -> None:
    listener = th.BackupListener(tmp_path)
    with pytest.raises(RuntimeError, match=r"CheckpointSaverHook\(checkpoint_dir, ..., listeners"):
        listener.after_save(Session(), 1)


# ---- EvaluationListener --------------------------------------------------------------


def read_w(prefix: str, step: int) -> float:
    """An eval_fn: the first weight of the checkpoint at ``prefix`` (equal to its step)."""
    return float(restore(prefix).state["w"][0])


def test_evaluation_runs_on_every_new_checkpoint(tmp_path: Path) -> None:
    evaluator = th.EvaluationListener(read_w)
    train(tmp_path, [evaluator], runs=5, save_steps=2)
    assert [(e.global_step, e.result) for e in evaluator.results] == [
        (0, 0.0), (2, 2.0), (4, 4.0), (5, 5.0),
    ]  # fmt: skip
    assert [e.checkpoint_path for e in evaluator.results] == [
        str(tmp_path / f"model.ckpt-{s}") for s in (0, 2, 4, 5)
    ]


def test_evaluation_skips_the_resave_of_an_evaluated_step(tmp_path: Path) -> None:
    evaluator = th.EvaluationListener(read_w)
    sess, _, hook = train(tmp_path, [evaluator], runs=1)
    hook.after_create_session(sess, th.Coordinator())  # re-saves step 1
    assert [e.global_step for e in evaluator.results] == [0, 1]


@pytest.mark.parametrize(("runs", "evaluated"), [(7, [0, 3, 6, 7]), (6, [0, 3, 6])])
def test_evaluation_every_n_steps_acts_at_end_once(
    tmp_path: Path, runs: int, evaluated: list[int]
) -> None:
    evaluator = th.EvaluationListener(read_w, every_n_steps=3)
    train(tmp_path, [evaluator], runs=runs, save_steps=1)
    assert [e.global_step for e in evaluator.results] == evaluated
    assert [e.result for e in evaluator.results] == [float(s) for s in evaluated]


def test_evaluation_stop_if_stops_training(tmp_path: Path) -> None:
    evaluator = th.EvaluationListener(read_w, stop_if=lambda w: w >= 4)
    sess, mon, _ = train(tmp_path, [evaluator], runs=100, save_steps=2)
    assert mon.should_stop()
    assert sess.global_step == 4
    assert [e.global_step for e in evaluator.results] == [0, 2, 4]


def test_evaluation_stop_if_with_a_monitored_session(tmp_path: Path) -> None:
    evaluator = th.EvaluationListener(read_w, every_n_steps=2, stop_if=lambda w: w >= 3)
    state = new_state()
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[evaluator])

    def train_op() -> None:
        state["w"] += 1

    with th.SingularMonitoredSession(hooks=[hook], checkpoint_dir=str(tmp_path), state=state) as s:
        while not s.should_stop():
            s.run(train_op)
        raw = s.raw_session()
        assert raw is not None and raw.global_step == 4
    assert [e.global_step for e in evaluator.results] == [0, 2, 4]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_evaluation_rejects_bad_every_n_steps(bad: Any) -> None:
    with pytest.raises(ValueError, match="every_n_steps must be a positive int"):
        th.EvaluationListener(read_w, every_n_steps=bad)


# ---- KeepBestListener ----------------------------------------------------------------

METRICS = {0: 5.0, 1: 3.0, 2: 4.0, 3: 1.0, 4: 2.0, 5: math.nan, 6: 6.0}


def metric(prefix: str, step: int) -> float:
    return METRICS[step]


def test_keep_best_keeps_the_best_out_of_retentions_reach(tmp_path: Path) -> None:
    best = th.KeepBestListener(metric, keep=2)
    train(tmp_path, [best], runs=6, saver=th.Saver(max_to_keep=1))
    best_dir = tmp_path / "best"
    assert checkpoint_names(tmp_path) == ["model.ckpt-6"]  # the Saver kept only the newest
    assert checkpoint_names(best_dir) == ["model.ckpt-3", "model.ckpt-4"]
    assert [(b.global_step, b.metric) for b in best.best] == [(3, 1.0), (4, 2.0)]
    # Worst to best, so that the model path and latest_checkpoint name the best one.
    assert listed(best_dir) == ["model.ckpt-4", "model.ckpt-3"]
    assert th.latest_checkpoint(str(best_dir)) == str(best_dir / "model.ckpt-3")
    restored = restore(th.latest_checkpoint(str(best_dir)))
    assert restored.global_step == 3
    np.testing.assert_array_equal(restored.state["w"], np.full(3, 3, np.float32))


def test_keep_best_hard_links_while_the_primary_exists(tmp_path: Path) -> None:
    best = th.KeepBestListener(metric, keep=1)
    train(tmp_path, [best], runs=1)
    primary, kept = tmp_path / "model.ckpt-1", tmp_path / "best" / "model.ckpt-1"
    assert same_files(primary, kept)
    for f in kept.rglob("*"):
        if f.is_file():
            assert os.stat(f).st_ino == os.stat(primary / f.relative_to(kept)).st_ino


def test_keep_best_max_mode_and_restart(tmp_path: Path) -> None:
    best = th.KeepBestListener(metric, keep=2, mode="max")
    train(tmp_path, [best], runs=2)  # metrics 5, 3, 4 -> keeps 0 and 2
    assert [b.global_step for b in best.best] == [0, 2]
    # A restarted job carries on ranking from best_checkpoints.json.
    again = th.KeepBestListener(metric, keep=2, mode="max")
    hook = th.CheckpointSaverHook(tmp_path, save_steps=1, listeners=[again])
    hook.begin()
    assert [b.global_step for b in again.best] == [0, 2]
    sess = Session(new_state(), global_step=6)
    hook.after_create_session(sess, th.Coordinator())  # metric 6.0: the new best
    assert [b.global_step for b in again.best] == [6, 0]
    assert checkpoint_names(tmp_path / "best") == ["model.ckpt-0", "model.ckpt-6"]
    assert th.latest_checkpoint(str(tmp_path / "best")) == str(tmp_path / "best" / "model.ckpt-6")


def test_keep_best_refuses_a_directory_ranked_the_other_way(tmp_path: Path) -> None:
    train(tmp_path, [th.KeepBestListener(metric, keep=2, mode="max")], runs=1)
    hook = th.CheckpointSaverHook(
        tmp_path, save_steps=1, listeners=[th.KeepBestListener(metric, mode="min")]
    )
    with pytest.raises(ValueError, match="mode='max'"):
        hook.begin()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep": 0}, "keep must be a positive int"),
        ({"mode": "best"}, 'mode must be "min" or "max"'),
        ({"subdir": "../elsewhere"}, "subdir must be a relative directory name"),
    ],
)
def test_keep_best_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        th.KeepBestListener(metric, **kwargs)


def test_keep_best_and_evaluation_stop_together(tmp_path: Path) -> None:
    # Listeners compose: every listener sees the save even when one asks to stop.
    best = th.KeepBestListener(metric, keep=1)
    stopper = th.EvaluationListener(read_w, stop_if=lambda w: w >= 1)
    _, mon, _ = train(tmp_path, [stopper, best], runs=10)
    assert mon.should_stop()
    assert [b.global_step for b in best.best] == [1]


def test_keep_best_scores_each_step_once(tmp_path: Path) -> None:
    scored: list[int] = []

    def counting_metric(prefix: str, step: int) -> float:
        scored.append(step)
        return METRICS[step]

    best = th.KeepBestListener(counting_metric, keep=2)
    sess, _, hook = train(tmp_path, [best], runs=1)
    hook.after_create_session(sess, th.Coordinator())  # re-saves step 1, as after a recovery
    assert scored == [0, 1]
    assert [b.global_step for b in best.best] == [1, 0]


def test_a_hostile_backup_state_file_never_deletes_outside_the_backup(tmp_path: Path) -> None:
    primary, backup = tmp_path / "run" / "ckpt", tmp_path / "run" / "backup"
    precious = tmp_path / "run" / "precious.txt"
    precious.parent.mkdir(parents=True)
    precious.write_text("keep me")
    backup.mkdir()
    # The backup's state file names ".." and the parent directory: never to be deleted.
    (backup / "checkpoint").write_text(
        f'model_checkpoint_path: ".."\nall_model_checkpoint_paths: ".."\n'
        f'all_model_checkpoint_paths: "{tmp_path / "run"}"\n'
    )
    train(primary, [th.BackupListener(backup, keep_all=True)], runs=2)
    assert precious.read_text() == "keep me"
    assert (tmp_path / "run" / "ckpt").is_dir()
    assert "model.ckpt-2" in listed(backup)


def test_a_hook_saving_into_another_directory_keeps_its_own_retention(tmp_path: Path) -> None:
    main, other = tmp_path / "main", tmp_path / "other"
    hook = th.CheckpointSaverHook(str(other), save_steps=1)
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(main),
        state=new_state(),
        chief_only_hooks=[hook],
        hooks=[th.StopAtStepHook(last_step=8)],
        save_checkpoint_steps=2,
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    for directory in (main, other):
        names = listed(directory)
        assert names == checkpoint_names(directory)  # each lists exactly what it holds
        assert all(n.startswith("model.ckpt-") for n in names)
    assert listed(main) == [f"model.ckpt-{s}" for s in (0, 2, 4, 6, 8)]
    assert listed(other) == [f"model.ckpt-{s}" for s in (4, 5, 6, 7, 8)]
