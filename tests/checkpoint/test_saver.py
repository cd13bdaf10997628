"""Saver: TF's saver_test / checkpoint_management_test cases ported, plus restore and recovery."""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from tests.helpers.checkpoints import array_session
from tests.helpers.storage_doubles import GatedStorage

from trainhooks import errors
from trainhooks.checkpoint.management.state_file import (
    checkpoint_exists,
    get_checkpoint_mtimes,
    get_checkpoint_state,
    latest_checkpoint,
    remove_checkpoint,
)
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.storage.lock import LOCK_FILE_NAME
from trainhooks.session.session import Session

if TYPE_CHECKING:
    from tests.helpers.clock import FakeClock


def _assert_state(save_dir: Path, model: str, paths: list[str]) -> None:
    ckpt = get_checkpoint_state(str(save_dir))
    assert ckpt is not None
    assert ckpt.model_checkpoint_path == model
    assert ckpt.all_model_checkpoint_paths == paths


def _files(directory: Path) -> list[str]:
    """The directory's entries, sorted, without the writer lock file the first save creates."""
    return sorted(n for n in os.listdir(directory) if n != LOCK_FILE_NAME)


def _corrupt(prefix: str) -> None:
    data = sorted(p for p in os.listdir(prefix) if p.endswith(".safetensors"))[0]
    path = os.path.join(prefix, data)
    raw = bytearray(Path(path).read_bytes())
    raw[-1] ^= 0xFF  # the last byte is tensor data
    Path(path).write_bytes(bytes(raw))


# ---- MaxToKeepTest ----------------------------------------------------------------------


def test_max_to_keep_non_sharded(tmp_path: Path) -> None:
    sess = array_session()
    save = Saver(max_to_keep=2)
    assert save.last_checkpoints == []
    s1 = save.save(sess, str(tmp_path / "s1"))
    assert s1 == str(tmp_path / "s1")
    assert save.last_checkpoints == [s1]
    assert checkpoint_exists(s1)
    _assert_state(tmp_path, s1, [s1])

    s2 = save.save(sess, str(tmp_path / "s2"))
    assert save.last_checkpoints == [s1, s2]
    assert checkpoint_exists(s1) and checkpoint_exists(s2)
    _assert_state(tmp_path, s2, [s1, s2])

    s3 = save.save(sess, str(tmp_path / "s3"))
    assert s1 and s2 and s3
    assert save.last_checkpoints == [s2, s3]
    assert not checkpoint_exists(s1)
    assert checkpoint_exists(s2) and checkpoint_exists(s3)
    _assert_state(tmp_path, s3, [s2, s3])

    # A second saver that knows the history, and a third that does not.
    save2 = Saver(max_to_keep=2)
    save2.set_last_checkpoints(save.last_checkpoints)
    save3 = Saver(max_to_keep=2)

    # The first: re-saving s2 moves it to the end; then s1 pushes s3 out.
    assert save.save(sess, s2) == s2
    assert save.last_checkpoints == [s3, s2]
    assert not checkpoint_exists(s1)
    assert checkpoint_exists(s3) and checkpoint_exists(s2)
    _assert_state(tmp_path, s2, [s3, s2])
    save.save(sess, s1)
    assert save.last_checkpoints == [s2, s1]
    assert not checkpoint_exists(s3)
    assert checkpoint_exists(s2) and checkpoint_exists(s1)
    _assert_state(tmp_path, s1, [s2, s1])

    # Unlike TensorFlow's Saver, whose second and third savers here write state files
    # listing s3 (deleted) and forgetting s1 (on disk), every saver first agrees with
    # the state file: it forgets what no longer exists and adopts what another listed.
    save2.save(sess, s2)
    assert save2.last_checkpoints == [s1, s2]
    assert checkpoint_exists(s1) and checkpoint_exists(s2)
    assert not checkpoint_exists(s3)  # deleted by the first saver, and not listed
    _assert_state(tmp_path, s2, [s1, s2])
    save2.save(sess, s1)
    assert save2.last_checkpoints == [s2, s1]
    assert checkpoint_exists(s2)
    _assert_state(tmp_path, s1, [s2, s1])

    # The third adopts s1 and s2 from the state file instead of forgetting s1.
    save3.save(sess, s2)
    assert save3.last_checkpoints == [s1, s2]
    assert checkpoint_exists(s1) and checkpoint_exists(s2)
    _assert_state(tmp_path, s2, [s1, s2])
    save3.save(sess, s1)
    assert save3.last_checkpoints == [s2, s1]
    assert checkpoint_exists(s2)
    _assert_state(tmp_path, s1, [s2, s1])
    assert _files(tmp_path) == ["checkpoint", "s1", "s2"]


def test_state_file_is_replaced_before_the_dropped_checkpoint_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save = Saver(max_to_keep=1)
    s1 = save.save(array_session(), str(tmp_path / "s1"))
    seen: list[str] = []
    real_rmtree = shutil.rmtree

    def spying_rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        seen.append((tmp_path / "checkpoint").read_text())
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", spying_rmtree)
    s2 = save.save(array_session(), str(tmp_path / "s2"))
    assert s1 and s2 and not checkpoint_exists(s1)
    # When s1's files went, the state file already named only s2.
    assert seen == [f'model_checkpoint_path: "{s2}"\nall_model_checkpoint_paths: "{s2}"\n']


def test_failed_retention_delete_is_logged_and_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save = Saver(max_to_keep=1)
    s1 = save.save(array_session(), str(tmp_path / "s1"))
    (tmp_path / "s1" / "notes.txt").write_text("not part of a checkpoint")
    with caplog.at_level(logging.WARNING):
        s2 = save.save(array_session(), str(tmp_path / "s2"))
    assert "Ignoring: " in caplog.text and "notes.txt" in caplog.text
    assert s1 and s2 and checkpoint_exists(s1)
    _assert_state(tmp_path, s2, [s2])


@pytest.mark.parametrize("max_to_keep", [None, 0])
def test_no_max_to_keep(tmp_path: Path, max_to_keep: int | None) -> None:
    sess = array_session()
    save = Saver(max_to_keep=max_to_keep)
    s1 = save.save(sess, str(tmp_path / "s1"))
    assert save.last_checkpoints == []
    assert s1 is not None and checkpoint_exists(s1)
    s2 = save.save(sess, str(tmp_path / "s2"))
    assert save.last_checkpoints == []
    assert s2 is not None and checkpoint_exists(s1) and checkpoint_exists(s2)
    _assert_state(tmp_path, s2, [s2])  # only the newest is listed
    for step in range(3, 10):
        save.save(sess, str(tmp_path / "s"), global_step=step)
    assert len([p for p in os.listdir(tmp_path) if p.startswith("s")]) == 9


def test_sharded_checkpoints_are_deleted_whole(tmp_path: Path) -> None:
    sess = Session({"a": np.zeros(64), "b": np.ones(64), "c": np.full(64, 2.0)})
    save = Saver(max_to_keep=2, max_shard_bytes=600)
    prefixes = [save.save(sess, str(tmp_path / "m"), global_step=s) for s in (1, 2, 3)]
    first = prefixes[0]
    assert first is not None
    assert not os.path.exists(first)
    data_files = [p for p in os.listdir(str(prefixes[2])) if p.endswith(".safetensors")]
    assert len(data_files) > 1
    assert _files(tmp_path) == ["checkpoint", "m-2", "m-3"]


# ---- KeepCheckpointEveryNHoursTest ------------------------------------------------------


def test_keep_checkpoint_every_n_hours(tmp_path: Path, clock: FakeClock) -> None:
    sess = array_session()
    start = clock()
    save = Saver(max_to_keep=2, keep_checkpoint_every_n_hours=0.7 / 3600, clock=clock)
    assert save.last_checkpoints == []
    clock.set(start + 1.0)  # s1 is old enough to keep
    s1 = save.save(sess, str(tmp_path / "s1"))
    assert save.last_checkpoints == [s1]
    s2 = save.save(sess, str(tmp_path / "s2"))
    assert save.last_checkpoints == [s1, s2]
    # s1 would be deleted (max_to_keep=2), but it is past the 0.7 s deadline: kept.
    s3 = save.save(sess, str(tmp_path / "s3"))
    assert save.last_checkpoints == [s2, s3]
    # The deadline is now start + 1.4: s2 (saved at start + 1.0) is deleted.
    s4 = save.save(sess, str(tmp_path / "s4"))
    assert save.last_checkpoints == [s3, s4]
    assert s1 and s2 and s3 and s4
    assert checkpoint_exists(s1)
    assert not checkpoint_exists(s2)
    assert checkpoint_exists(s3) and checkpoint_exists(s4)
    _assert_state(tmp_path, s4, [s3, s4])  # s1 is kept for good but no longer listed


def test_keep_deadline_steps_from_the_previous_deadline(tmp_path: Path, clock: FakeClock) -> None:
    start = clock()
    sess = array_session()
    save = Saver(max_to_keep=1, keep_checkpoint_every_n_hours=10 / 3600, clock=clock)
    paths = []
    for name, at in (("a", 25), ("b", 26), ("c", 27), ("d", 29)):
        clock.set(start + at)
        paths.append(save.save(sess, str(tmp_path / name)))
    a, b, c, d = paths
    # a (25 > 10) is kept and the deadline becomes 20, not 25 + 10: so b (26) is kept
    # too and the deadline becomes 30; c (27) is deleted.
    assert a and b and c and d
    assert checkpoint_exists(a) and checkpoint_exists(b)
    assert not checkpoint_exists(c)
    assert checkpoint_exists(d)


# ---- recover_last_checkpoints -----------------------------------------------------------


def test_recover_last_checkpoints(tmp_path: Path) -> None:
    sess = array_session()
    save = Saver(max_to_keep=10)
    s1, s2, s3 = (save.save(sess, str(tmp_path / f"ckpt-{i}")) for i in (1, 2, 3))
    assert s1 and s2 and s3
    assert save.last_checkpoints == [s1, s2, s3]

    save2 = Saver(max_to_keep=10)
    assert save2.last_checkpoints == []
    save2.recover_last_checkpoints([s1, s2, s3])
    assert save2.last_checkpoints == [s1, s2, s3]

    remove_checkpoint(s1)
    assert not checkpoint_exists(s1)
    save3 = Saver(max_to_keep=10)
    save3.recover_last_checkpoints([s1, s2, s3])
    assert save3.last_checkpoints == [s2, s3]
    s4 = save3.save(sess, str(tmp_path / "ckpt-4"))
    assert s4 is not None
    _assert_state(tmp_path, s4, [s2, s3, s4])


def test_recovered_bookkeeping_keeps_max_to_keep_across_restarts(tmp_path: Path) -> None:
    sess = array_session()
    first = Saver(max_to_keep=2)
    for step in (1, 2):
        first.save(sess, str(tmp_path / "model.ckpt"), global_step=step)
    restarted = Saver(max_to_keep=2)
    assert restarted.restore_latest(array_session(), str(tmp_path)) == str(
        tmp_path / "model.ckpt-2"
    )
    assert restarted.last_checkpoints == [str(tmp_path / f"model.ckpt-{s}") for s in (1, 2)]
    restarted.save(sess, str(tmp_path / "model.ckpt"), global_step=3)
    assert _files(tmp_path) == ["checkpoint", "model.ckpt-2", "model.ckpt-3"]


# ---- LatestCheckpointWithRelativePaths --------------------------------------------------


def test_name_collision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    filepath = os.path.join("train", "checkpoint")
    sess = array_session()
    saver = Saver()
    with pytest.raises(ValueError, match="collides with"):
        saver.save(sess, filepath)
    assert os.listdir("train") == []
    assert saver.save(sess, filepath, global_step=1) == "train/checkpoint-1"
    assert latest_checkpoint("train") == "train/checkpoint-1"
    with pytest.raises(ValueError, match="'latest_filename' collides with 'save_path'"):
        saver.save(sess, "train/state", latest_filename="state")


def test_relative_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    filepath = os.path.join("train", "snapshot")
    v0 = np.array(0.0)
    save = Saver({"v0": v0})
    sess = Session({})
    for step in range(3):
        v0 += 1.0
        save.save(sess, filepath, global_step=step)
    assert Path("train/checkpoint").read_text() == (
        'model_checkpoint_path: "snapshot-2"\n'
        'all_model_checkpoint_paths: "snapshot-0"\n'
        'all_model_checkpoint_paths: "snapshot-1"\n'
        'all_model_checkpoint_paths: "snapshot-2"\n'
    )
    fresh = np.array(-1.0)
    name = latest_checkpoint("train")
    assert name == os.path.join("train", "snapshot-2")
    Saver({"v0": fresh}).restore(Session({}), name)
    assert fresh == 3.0


def test_save_in_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert Saver().save(array_session(), "model", global_step=4) == "model-4"
    assert Path("checkpoint").read_text() == (
        'model_checkpoint_path: "model-4"\nall_model_checkpoint_paths: "model-4"\n'
    )
    assert latest_checkpoint("") == "model-4"


# ---- SaverUtilsTest ---------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [None, 600])
def test_checkpoint_exists(tmp_path: Path, max_shard_bytes: int | None) -> None:
    sess = Session({"a": np.zeros(64), "b": np.ones(64)})
    prefix = Saver(max_shard_bytes=max_shard_bytes).save(sess, str(tmp_path / "ckpt"))
    assert prefix is not None and checkpoint_exists(prefix)
    assert not checkpoint_exists(str(tmp_path / "other"))


def test_get_checkpoint_mtimes(tmp_path: Path) -> None:
    saver = Saver()
    prefixes = [saver.save(array_session(), str(tmp_path / str(i))) for i in (1, 2)]
    mtimes = get_checkpoint_mtimes([p for p in prefixes if p])
    assert len(mtimes) == 2
    assert mtimes[1] >= mtimes[0]
    manifest = os.path.join(str(prefixes[0]), "manifest.json")
    assert mtimes[0] == pytest.approx(os.stat(manifest).st_mtime_ns / 1e9)


@pytest.mark.parametrize("max_shard_bytes", [None, 600])
def test_remove_checkpoint(tmp_path: Path, max_shard_bytes: int | None) -> None:
    sess = Session({"a": np.zeros(64), "b": np.ones(64)})
    prefix = Saver(max_shard_bytes=max_shard_bytes).save(sess, str(tmp_path / "ckpt"))
    assert prefix is not None and checkpoint_exists(prefix)
    remove_checkpoint(prefix)
    assert not checkpoint_exists(prefix)
    assert _files(tmp_path) == ["checkpoint"]


# ---- save(): names, arguments and errors ------------------------------------------------


def test_save_names_and_returns_the_prefix(tmp_path: Path) -> None:
    sess = array_session(step=42)
    assert Saver().save(sess, str(tmp_path / "m"), global_step=42) == str(tmp_path / "m-42")
    padded = Saver(pad_step_number=True).save(sess, str(tmp_path / "p"), global_step=42)
    assert padded == str(tmp_path / "p-00000042")
    assert os.path.isfile(os.path.join(padded, "manifest.json"))
    assert Saver().save(sess, str(tmp_path / "n"), global_step=np.int64(7)) == str(tmp_path / "n-7")
    with pytest.raises(TypeError, match="global_step must be an integer"):
        Saver().save(sess, str(tmp_path / "x"), global_step=1.5)  # type: ignore[arg-type]


def test_filename_is_the_default_save_path(tmp_path: Path) -> None:
    saver = Saver(filename=str(tmp_path / "model.ckpt"))
    assert saver.save(array_session(), None, global_step=1) == str(tmp_path / "model.ckpt-1")
    with pytest.raises(ValueError, match="save_path is None"):
        Saver().save(array_session(), None)


def test_latest_filename_must_not_contain_path_components(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'latest_filename' must not contain path components"):
        Saver().save(array_session(), str(tmp_path / "m"), latest_filename="sub/checkpoint")
    assert os.listdir(tmp_path) == []


def test_custom_latest_filename(tmp_path: Path) -> None:
    prefix = Saver().save(array_session(), str(tmp_path / "m"), 1, latest_filename="latest")
    assert _files(tmp_path) == ["latest", "m-1"]
    assert latest_checkpoint(str(tmp_path), "latest") == prefix


def test_missing_parent_directory(tmp_path: Path) -> None:
    save_path = str(tmp_path / "missing" / "model.ckpt")
    with pytest.raises(ValueError, match=r"Parent directory of .*missing/model.ckpt doesn't exist"):
        Saver().save(array_session(), save_path, global_step=1)


def test_write_state_false_leaves_state_file_and_bookkeeping(tmp_path: Path) -> None:
    saver = Saver(max_to_keep=1)
    for step in (1, 2):
        prefix = saver.save(array_session(), str(tmp_path / "m"), step, write_state=False)
        assert prefix is not None and checkpoint_exists(prefix)
    assert saver.last_checkpoints == []
    assert _files(tmp_path) == ["m-1", "m-2"]


def test_save_relative_paths(tmp_path: Path) -> None:
    saver = Saver(save_relative_paths=True)
    for step in (1, 2):
        saver.save(array_session(), str(tmp_path / "m"), global_step=step)
    assert (tmp_path / "checkpoint").read_text() == (
        'model_checkpoint_path: "m-2"\n'
        'all_model_checkpoint_paths: "m-1"\n'
        'all_model_checkpoint_paths: "m-2"\n'
    )
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    tmp_path.rename(moved)
    assert latest_checkpoint(str(moved)) == os.path.join(str(moved), "m-2")


def test_first_save_removes_crash_leftovers(tmp_path: Path) -> None:
    leftover = tmp_path / "model.ckpt-5.tmp-0123456789ab"
    leftover.mkdir()
    (leftover / "data-00000-of-00001.safetensors").write_bytes(b"partial")
    Saver().save(array_session(), str(tmp_path / "model.ckpt"), global_step=6)
    assert _files(tmp_path) == ["checkpoint", "model.ckpt-6"]


def test_resave_of_an_existing_step_replaces_it(tmp_path: Path) -> None:
    saver = Saver()
    sess = array_session(1.0, step=5)
    prefix = saver.save(sess, str(tmp_path / "m"), global_step=5)
    sess.state["v"][:] = 9.0
    assert saver.save(sess, str(tmp_path / "m"), global_step=5) == prefix
    assert saver.last_checkpoints == [prefix]
    target = array_session(0.0)
    Saver().restore(target, str(prefix))
    assert target.state["v"].tolist() == [9.0, 9.0]
    assert _files(tmp_path) == ["checkpoint", "m-5"]


def test_var_list_validation() -> None:
    with pytest.raises(ValueError, match="No variables to save"):
        Saver(var_list={})
    with pytest.raises(ValueError, match="No variables to save"):
        Saver(var_list=[])
    with pytest.raises(TypeError, match="var_list as a list must hold keys"):
        Saver(var_list=[np.zeros(1)])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="var_list must be a dict"):
        Saver(var_list="v")
    with pytest.raises(ValueError, match="max_to_keep must be a non-negative integer"):
        Saver(max_to_keep=-1)
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive"):
        Saver(max_shard_bytes=0)


def test_allow_empty_saver_is_a_no_op(tmp_path: Path) -> None:
    saver = Saver(var_list={}, allow_empty=True)
    sess = array_session(step=3)
    assert saver.save(sess, str(tmp_path / "m"), global_step=3) is None
    assert os.listdir(tmp_path) == []
    saver.restore(sess, str(tmp_path / "m-3"))  # nothing to restore: no error
    assert sess.global_step == 3


def test_var_list_as_state_keys(tmp_path: Path) -> None:
    sess = Session({"model": np.arange(3.0), "scratch": np.ones(2), "epoch": 4}, global_step=9)
    prefix = Saver(var_list=["model", "epoch"]).save(sess, str(tmp_path / "m"), 9)
    assert prefix is not None
    fresh = Session({"model": np.zeros(3), "scratch": np.zeros(2), "epoch": 0})
    Saver(var_list=["model", "epoch"]).restore(fresh, prefix)
    assert fresh.state["model"].tolist() == [0.0, 1.0, 2.0]
    assert fresh.state["epoch"] == 4  # a Python value is replaced in the session's state
    assert fresh.state["scratch"].tolist() == [0.0, 0.0]
    assert fresh.global_step == 9
    with pytest.raises(KeyError, match=r"names \['nope'\], which the session's state"):
        Saver(var_list=["nope"]).save(sess, str(tmp_path / "x"))


# ---- restore ----------------------------------------------------------------------------


def test_restore_sets_state_in_place_and_global_step(tmp_path: Path) -> None:
    prefix = Saver().save(array_session(5.0, step=12), str(tmp_path / "m"), global_step=12)
    target = array_session(0.0)
    held = target.state["v"]
    Saver().restore(target, str(prefix))
    assert held.tolist() == [5.0, 6.0]  # the array the user holds was updated
    assert target.global_step == 12


def test_restore_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"The passed save_path is not a valid checkpoint: .*m-1"):
        Saver().restore(array_session(), str(tmp_path / "m-1"))


def test_restore_refuses_a_tensorflow_checkpoint(tmp_path: Path) -> None:
    for suffix in (".index", ".data-00000-of-00001"):
        Path(str(tmp_path / "m-1") + suffix).write_bytes(b"tf")
    with pytest.raises(ValueError, match="is a TensorFlow checkpoint"):
        Saver().restore(array_session(), str(tmp_path / "m-1"))


def test_restore_of_a_corrupt_checkpoint_changes_nothing(tmp_path: Path) -> None:
    prefix = Saver().save(array_session(5.0, step=3), str(tmp_path / "m"), global_step=3)
    assert prefix is not None
    _corrupt(prefix)
    target = array_session(0.0, step=1)
    with pytest.raises(errors.DataLossError, match="checksum mismatch"):
        Saver().restore(target, prefix)
    assert target.state["v"].tolist() == [0.0, 1.0]
    assert target.global_step == 1


def test_restore_latest_falls_back_to_newest_verified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saver = Saver(max_to_keep=5)
    prefixes = []
    for step in (1, 2, 3):
        prefixes.append(saver.save(array_session(float(step), step), str(tmp_path / "m"), step))
    p1, p2, p3 = (str(p) for p in prefixes)
    _corrupt(p3)
    remove_checkpoint(p2)
    target = array_session(0.0)
    restarted = Saver(max_to_keep=5)
    with caplog.at_level(logging.WARNING):
        assert restarted.restore_latest(target, str(tmp_path)) == p1
    assert target.state["v"].tolist() == [1.0, 2.0]
    assert target.global_step == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"Restored {p1} instead of the latest checkpoint" in warnings[0]
    assert f"{p3} (failed verification:" in warnings[0]
    assert f"{p2} (missing:" in warnings[0]
    # Bookkeeping: only the checkpoints still on disk.
    assert restarted.last_checkpoints == [p1, p3]


def test_restore_latest_without_state_file(tmp_path: Path) -> None:
    target = array_session(0.0, step=4)
    assert Saver().restore_latest(target, str(tmp_path)) is None
    assert target.global_step == 4


def test_restore_latest_when_nothing_is_left(tmp_path: Path) -> None:
    saver = Saver()
    prefix = saver.save(array_session(), str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    remove_checkpoint(prefix)
    with pytest.raises(ValueError, match="not a valid checkpoint"):
        Saver().restore_latest(array_session(), str(tmp_path))
    saver.save(array_session(), str(tmp_path / "m"), global_step=2)
    _corrupt(str(tmp_path / "m-2"))
    with pytest.raises(errors.DataLossError, match=r"No checkpoint listed in .* could be restored"):
        Saver().restore_latest(array_session(), str(tmp_path))


def test_restore_latest_does_not_hide_a_state_mismatch(tmp_path: Path) -> None:
    saver = Saver()
    saver.save(array_session(), str(tmp_path / "m"), global_step=1)
    saver.save(array_session(), str(tmp_path / "m"), global_step=2)
    other = Session({"w": np.zeros(2)})
    with pytest.raises(ValueError, match="does not match the state"):
        Saver().restore_latest(other, str(tmp_path))
    assert other.state["w"].tolist() == [0.0, 0.0]


# ---- the writer lock and the storage ----------------------------------------------------

_SAVE_IN_ANOTHER_PROCESS = """
import sys
import numpy as np
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session
Saver().save(Session({"v": np.ones(2)}, global_step=9), sys.argv[1] + "/m", global_step=9)
"""


def _save_in_another_process(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _SAVE_IN_ANOTHER_PROCESS, str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow  # a second process saves, twice
def test_saver_holds_the_writer_lock_from_its_first_save_until_close(tmp_path: Path) -> None:
    saver = Saver()
    reader = Saver()
    reader.restore_latest(array_session(), str(tmp_path))  # restores never take the lock
    saver.save(array_session(), str(tmp_path / "m"), global_step=1)
    refused = _save_in_another_process(tmp_path)
    assert refused.returncode != 0
    assert "CheckpointDirLockedError" in refused.stderr
    assert f"locked for writing by process {os.getpid()}" in refused.stderr
    assert not os.path.exists(tmp_path / "m-9")
    saver.save(array_session(), str(tmp_path / "m"), global_step=2)  # still ours
    saver.close()
    assert _save_in_another_process(tmp_path).returncode == 0
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-9")


@pytest.mark.slow  # a second process saves
def test_a_saver_dropped_without_close_releases_the_lock(tmp_path: Path) -> None:
    Saver().save(array_session(), str(tmp_path / "m"), global_step=1)
    gc.collect()
    assert _save_in_another_process(tmp_path).returncode == 0


def test_checkpoint_directories_are_written_through_the_storage(tmp_path: Path) -> None:
    storage = GatedStorage()
    saver = Saver(storage=storage)
    first = saver.save(array_session(), str(tmp_path / "m"), global_step=1)
    assert [name.split(".tmp-")[0] for name in storage.made] == ["m-1"]
    storage.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError, match=r"No space left on device: saving checkpoint .*m-2"):
        saver.save(array_session(), str(tmp_path / "m"), global_step=2)
    _assert_state(tmp_path, str(first), [str(first)])


# ---- restore(strict=False): what was restored, what was skipped -------------------------


def _model(seed: int, hidden: int = 4) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.Linear(hidden, 2))


def test_non_strict_restore_reports_and_logs_each_entry(tmp_path: Path, caplog: Any) -> None:
    import torch

    model = _model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saved = {"model": model, "opt": optimizer, "w": np.ones(2), "old_head": np.ones(3)}
    prefix = Saver().save(Session(saved, global_step=4), str(tmp_path / "m"), global_step=4)
    assert prefix is not None

    bigger = torch.nn.Sequential(*_model(1), torch.nn.Linear(2, 2))  # one layer more
    fresh_opt = torch.optim.SGD(bigger[:2].parameters(), lr=0.5, momentum=0.9)
    state = {"model": bigger, "opt": fresh_opt, "w": np.zeros(2), "ema": _model(2)}
    session = Session(state)
    with caplog.at_level(logging.INFO, logger="trainhooks.checkpoint.state.tree"):
        report = Saver().restore(session, prefix, strict=False)
    assert report is not None and session.global_step == 4
    assert report.restored == ["opt", "w"]
    assert report.partial == ["model"]
    assert report.not_restored == ["ema"]
    assert report.unused == ["old_head"]
    assert sorted(p.path for p in report.skipped) == [
        "state['ema']",
        "state['model'].state_dict()['2.bias']",
        "state['model'].state_dict()['2.weight']",
        "state['old_head']",
    ]
    assert torch.equal(bigger[0].weight, model[0].weight)
    assert fresh_opt.param_groups[0]["lr"] == 0.1 and state["w"].tolist() == [1.0, 1.0]
    text = caplog.text
    assert "Restored (strict=False): state['opt'] in full" in text
    assert "Restored (strict=False): state['model'] in part" in text
    assert "Not restored (strict=False): state['model'].state_dict()['2.weight'] missing" in text
    assert "Not restored (strict=False): state['ema'] is missing from the checkpoint" in text
    assert "Not restored (strict=False): checkpoint entry 'old_head', not in the state" in text
    assert "2 entries restored in full, 1 in part, 1 not restored" in text
    assert Saver().restore(Session({"model": _model(3)}), prefix, strict=False) is not None
    assert Saver().restore(Session(saved), prefix) is None  # strict: TensorFlow's None


def test_non_strict_restore_of_an_ema_model_into_a_plain_one_is_refused(tmp_path: Path) -> None:
    import torch

    from trainhooks.checkpoint.state.tree import StateMismatchError

    model = _model(0)
    ema = torch.optim.swa_utils.AveragedModel(model)  # keys 'module.0.weight', 'n_averaged'
    prefix = Saver().save(Session({"model": ema, "step": 5}), str(tmp_path / "m"), 1)
    assert prefix is not None
    plain = _model(1)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    session = Session({"model": plain, "step": 0})
    with pytest.raises(StateMismatchError) as info:
        Saver().restore(session, prefix, strict=False)
    text = str(info.value)
    assert "even with strict=False" in text
    assert "state['model'] (Sequential) matches none of the checkpoint's keys" in text
    assert "'module.0.weight'" in text and "'0.weight'" in text
    assert info.value.problems[0].path == "state['model']" and not info.value.strict
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
    assert session.state["step"] == 0 and session.global_step == 0  # nothing was restored


def test_non_strict_restore_refuses_an_optimizer_over_other_parameters(tmp_path: Path) -> None:
    import torch

    from trainhooks.checkpoint.state.tree import StateMismatchError

    model = _model(0)
    state = {"model": model, "opt": torch.optim.Adam(model.parameters())}
    prefix = Saver().save(Session(state), str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    target = _model(1)
    other = torch.optim.Adam(target[0].parameters(), lr=0.5)
    with pytest.raises(
        StateMismatchError, match=r"parameter groups of sizes \[2\], the checkpoint \[4\]"
    ):
        Saver().restore(Session({"model": target, "opt": other}), prefix, strict=False)
    assert not torch.equal(target[0].weight, model[0].weight)  # nothing written
    assert other.param_groups[0]["lr"] == 0.5


def test_non_strict_restore_skips_an_object_the_checkpoint_lacks(tmp_path: Path) -> None:
    model = _model(0)
    prefix = Saver().save(Session({"model": model}), str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    target, head = _model(1), _model(2)
    report = Saver().restore(Session({"model": target, "head": head}), prefix, strict=False)
    assert report is not None and report.not_restored == ["head"]
    assert report.restored == ["model"]
