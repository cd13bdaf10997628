"""Faults at every storage operation of a save: no listed checkpoint is ever damaged.

A save goes through ``FaultyStorage`` (``tests/helpers/storage_doubles.py``), which
fails one chosen operation with ENOSPC, EIO or EACCES, cuts a write short, or stalls it.
The sweep first records a clean save, then fails each of its operations in turn, for a
new step and for a re-save of a listed step. A real, tiny tmpfs then gives real ENOSPC and EROFS through
``Saver`` itself (skipped where mounting is not allowed).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.checkpoints import leftovers
from tests.helpers.storage_doubles import Fault, FaultyStorage

import trainhooks as th
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.management.state_file import (
    get_checkpoint_state,
    update_checkpoint_state,
)
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.state import tree
from trainhooks.checkpoint.storage.commit import is_checkpoint, remove_leftovers
from trainhooks.session.session import Session

torch = pytest.importorskip("torch")


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"weight": torch.randn(4, 3, generator=g), "bias": torch.randn(3, generator=g)},
        "moments": np.arange(6, dtype=np.float64) * step,
        "step_name": f"step-{step}",
    }


def _save(directory: Path, step: int, storage: Any = None) -> str:
    """What Saver does: commit the directory, then list it in the state file."""
    prefix = str(directory / f"model.ckpt-{step}")
    write_checkpoint(prefix, tree.flatten_state(_state(step)), global_step=step, storage=storage)
    listed = get_checkpoint_state(directory)
    paths = [p for p in (listed.all_model_checkpoint_paths if listed else []) if p != prefix]
    update_checkpoint_state(directory, prefix, [*paths, prefix])
    return prefix


def _assert_listed_intact(directory: Path) -> int:
    """Every listed checkpoint verifies; the latest restores bit-exactly. Returns its step."""
    listed = get_checkpoint_state(directory)
    assert listed is not None
    for prefix in listed.all_model_checkpoint_paths:
        with open_checkpoint(prefix) as ckpt:
            ckpt.verify()
    restored = _state(999)
    sess = Session(restored)
    Saver().restore(sess, listed.model_checkpoint_path)
    expected = _state(sess.global_step)
    for key in ("weight", "bias"):
        assert torch.equal(restored["model"][key], expected["model"][key])
    np.testing.assert_array_equal(restored["moments"], expected["moments"])
    assert restored["step_name"] == expected["step_name"]
    return sess.global_step


def _recorded_ops(tmp_path: Path, resave: bool, exchange: bool = True) -> list[tuple[str, str]]:
    probe = tmp_path / "probe"
    probe.mkdir()
    _save(probe, 1)
    storage = FaultyStorage(exchange=exchange)
    write_checkpoint(
        str(probe / f"model.ckpt-{1 if resave else 2}"),
        tree.flatten_state(_state(1 if resave else 2)),
        global_step=1 if resave else 2,
        storage=storage,
    )
    return storage.ops


@pytest.mark.parametrize(
    ("resave", "exchange"),
    [
        pytest.param(False, True, id="new-step"),
        pytest.param(True, True, id="resave-exchange"),
        pytest.param(True, False, id="resave-rename-aside"),
    ],
)
def test_a_fault_at_every_operation_of_a_save_damages_no_listed_checkpoint(
    tmp_path: Path, resave: bool, exchange: bool
) -> None:
    ops = _recorded_ops(tmp_path, resave, exchange)
    writes = [i for i, (op, _) in enumerate(ops) if op == "write"]
    assert len(writes) >= 2 and len(ops) >= 8, ops
    cases = [Fault(i, kind) for i in range(len(ops)) for kind in ("enospc", "eio")]
    cases += [Fault(i, "partial") for i in writes] + [Fault(i, "eacces") for i in writes[:1]]
    step = 1 if resave else 2
    for n, fault in enumerate(cases):
        directory = tmp_path / f"case{n}"
        directory.mkdir()
        _save(directory, 1)
        storage = FaultyStorage(fault, exchange=exchange)
        try:
            _save(directory, step, storage)
        except OSError as e:
            assert e.errno in (errno.ENOSPC, errno.EIO, errno.EACCES), e
        assert storage.fired is not None, f"{fault} did not fire: {storage.ops}"
        where = f"{fault} at {storage.fired}"
        # Every listed checkpoint is intact right away, while training goes on ...
        assert _assert_listed_intact(directory) in (1, step), where
        new = directory / f"model.ckpt-{step}"
        if new.exists():  # committed before the fault (e.g. the parent's fsync failed)
            assert is_checkpoint(new), where
            with open_checkpoint(new) as ckpt:
                ckpt.verify()
        # ... and the next start removes what the failed save left behind.
        remove_leftovers(directory)
        assert leftovers(directory) == [], where
        assert _assert_listed_intact(directory) in (1, step), where
        # Saving again works: training continues once the fault is gone.
        _save(directory, 3)
        assert _assert_listed_intact(directory) == 3, where


def test_a_failed_save_names_the_path_and_the_cause(tmp_path: Path) -> None:
    ops = _recorded_ops(tmp_path, resave=False)
    first_write = next(i for i, (op, _) in enumerate(ops) if op == "write")
    directory = tmp_path / "run"
    directory.mkdir()
    with pytest.raises(OSError) as info:
        _save(directory, 2, FaultyStorage(Fault(first_write, "enospc")))
    assert info.value.errno == errno.ENOSPC
    assert str(directory / "model.ckpt-2") in str(info.value)
    assert "No space left on device" in str(info.value)


def test_a_stalled_write_leaves_readers_the_previous_checkpoint(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    ops = _recorded_ops(tmp_path, resave=False)
    first_write = next(i for i, (op, _) in enumerate(ops) if op == "write")
    stalled, release = threading.Event(), threading.Event()

    def stall() -> None:
        stalled.set()
        assert release.wait(60)

    storage = FaultyStorage(Fault(first_write, "slow"), on_slow=stall)
    errors: list[BaseException] = []

    def save() -> None:
        try:
            _save(tmp_path, 2, storage)
        except BaseException as e:
            errors.append(e)

    writer = threading.Thread(target=save)
    writer.start()
    try:
        assert stalled.wait(60)
        # Mid-save: readers see step 1, complete, and no half-written step 2.
        assert _assert_listed_intact(tmp_path) == 1
        assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-1")
        assert not is_checkpoint(tmp_path / "model.ckpt-2")
    finally:
        release.set()
        writer.join()
    assert errors == []
    assert _assert_listed_intact(tmp_path) == 2


# ---- a real, tiny file system ----------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs; skipped where this process may not mount one."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e}); needs root or CAP_SYS_ADMIN")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)


def _fill(directory: Path, leave_free: int) -> Path:
    """Fill the file system until only about ``leave_free`` bytes are left."""
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_free))
    return filler


def _big_state(step: int) -> dict[str, Any]:
    state = _state(step)
    state["buffer"] = np.full(6000, step, dtype=np.float64)  # ~48 KB: several pages
    return state


def test_real_enospc_at_every_fill_level_damages_no_listed_checkpoint(tiny_fs: Path) -> None:
    saver = Saver(max_to_keep=2)
    save_path = str(tiny_fs / "model.ckpt")
    sess = Session(_big_state(1), global_step=1)
    saver.save(sess, save_path, global_step=1)
    failures = 0
    for level, leave_free in enumerate(range(0, 72 * 1024, 4096)):
        step = 2 + level
        filler = _fill(tiny_fs, leave_free)
        sess = Session(_big_state(step), global_step=step)
        try:
            saver.save(sess, save_path, global_step=step)
        except OSError as e:
            assert e.errno == errno.ENOSPC
            failures += 1
        listed = get_checkpoint_state(tiny_fs)
        assert listed is not None
        for prefix in listed.all_model_checkpoint_paths:
            with open_checkpoint(prefix) as ckpt:
                ckpt.verify()
        restored = Session(_big_state(0))
        saver.restore(restored, listed.model_checkpoint_path)
        expected = _big_state(restored.global_step)
        np.testing.assert_array_equal(restored.state["buffer"], expected["buffer"])
        assert torch.equal(restored.state["model"]["weight"], expected["model"]["weight"])
        filler.unlink()
        remove_leftovers(tiny_fs)
        assert leftovers(tiny_fs) == []
    assert failures >= 3  # the sweep did hit a full disk at several points


def test_read_only_file_system_refuses_saves_and_still_restores(tiny_fs: Path) -> None:
    saver = Saver()
    sess = Session(_state(1), global_step=1)
    saver.save(sess, str(tiny_fs / "model.ckpt"), global_step=1)
    saver.close()  # releases the writer lock: a file open for writing keeps the fs busy
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True, capture_output=True)
    with pytest.raises(OSError) as info:
        Saver().save(Session(_state(2), global_step=2), str(tiny_fs / "model.ckpt"), global_step=2)
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    restored = Session(_state(0))
    assert Saver().restore_latest(restored, str(tiny_fs)) == str(tiny_fs / "model.ckpt-1")
    assert torch.equal(restored.state["model"]["bias"], _state(1)["model"]["bias"])


def test_training_told_to_log_and_continue_keeps_going_on_a_full_disk(
    tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = _big_state(0)
    steps = []
    with (
        caplog.at_level(logging.ERROR),
        th.MonitoredTrainingSession(
            checkpoint_dir=str(tiny_fs),
            state=state,
            save_checkpoint_steps=1,
            save_summaries_steps=0,
            log_step_count_steps=0,
            on_checkpoint_error="log",
            hooks=[th.StopAtStepHook(last_step=6)],
        ) as sess,
    ):
        filler = _fill(tiny_fs, 0)
        while not sess.should_stop():
            sess.run(lambda: None)
            steps.append(len(steps) + 1)
            if len(steps) == 3:
                filler.unlink()  # space comes back: saving resumes
    assert len(steps) == 6
    assert "No space left on device" in caplog.text
    listed = get_checkpoint_state(tiny_fs)
    assert listed is not None and listed.model_checkpoint_path.endswith("model.ckpt-6")
