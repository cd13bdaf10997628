"""Restarts a user can trust: real training processes started again and again on one
directory, with the directory moved, files lost or damaged between runs, a finished job
requeued and a preempted one told apart from it.

Each run is ``tests/_programs/restart_run.py``: the seeds' pattern (a
``CheckpointSaverHook`` of one's own in ``chief_only_hooks`` of a
``MonitoredTrainingSession`` that restores from the same directory).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.paths import PROGRAMS, SRC

import trainhooks as th

pytestmark = pytest.mark.slow  # several Python processes per test

PROGRAM = PROGRAMS / "restart_run.py"
_PREFIX = "model.ckpt-"


def run(directory: Path, *args: str, expect_rc: int = 0) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    out = subprocess.run(
        [sys.executable, str(PROGRAM), str(directory), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == expect_rc, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    report: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    report["stderr"] = out.stderr
    return report


def on_disk(directory: Path) -> list[int]:
    """Steps of the committed checkpoints in ``directory``."""
    return sorted(
        int(name[len(_PREFIX) :])
        for name in os.listdir(directory)
        if name.startswith(_PREFIX) and name[len(_PREFIX) :].isdigit()
    )


def listed(directory: Path) -> list[int]:
    """Steps the state file lists, and a check that each names a checkpoint in it."""
    state = th.get_checkpoint_state(str(directory))
    assert state is not None
    steps = []
    for path in state.all_model_checkpoint_paths:
        assert os.path.dirname(os.path.abspath(path)) == str(directory), path
        assert th.checkpoint_exists(path), f"the state file lists {path}, which is gone"
        steps.append(int(path.rsplit("-", 1)[1]))
    return steps


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.run(
        [sys.executable, "-m", "trainhooks.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_the_seeds_pattern_restarted_keeps_max_to_keep_across_runs(tmp_path: Path) -> None:
    # Five runs of 10 steps, a checkpoint every 2: retention (max_to_keep=5) must hold
    # across every restart and both savers (the hook's and the session's default one).
    for n in range(1, 6):
        report = run(tmp_path, "--num-steps", "10", "--save-steps", "2")
        assert (report["start"], report["end"]) == (10 * (n - 1), 10 * n)
        assert on_disk(tmp_path) == listed(tmp_path) == [10 * n - 8 + 2 * i for i in range(5)]
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / f"{_PREFIX}50")


def test_a_moved_run_directory_resumes_and_the_cli_reports_on_it(tmp_path: Path) -> None:
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    first.mkdir()
    run(first, "--num-steps", "6")
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))
    report = run(moved, "--num-steps", "4")
    assert (report["start"], report["end"]) == (6, 10)
    assert on_disk(moved) == listed(moved) == [2, 4, 6, 8, 10]
    assert cli("list", str(moved)).returncode == 0
    verify = cli("verify", str(moved))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert str(first) not in verify.stdout


def test_a_copied_run_directory_resumes_from_its_own_checkpoints(tmp_path: Path) -> None:
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    run(original, "--num-steps", "4")
    shutil.copytree(original, copy)
    # The copy's state file still names the original's checkpoints (absolute paths).
    assert str(original) in (copy / "checkpoint").read_text()
    report = run(copy, "--num-steps", "2")
    assert (report["start"], report["end"]) == (4, 6)
    assert listed(copy)[-1] == 6
    assert on_disk(original) == [0, 2, 4]  # untouched
    assert th.latest_checkpoint(str(copy)) == str(copy / f"{_PREFIX}6")


@pytest.mark.parametrize("damage", ["deleted", "garbage", "empty"])
def test_a_lost_or_unreadable_state_file_resumes_from_the_newest_checkpoint(
    tmp_path: Path, damage: str
) -> None:
    run(tmp_path, "--num-steps", "8")
    state_file = tmp_path / "checkpoint"
    if damage == "deleted":
        state_file.unlink()
    else:
        state_file.write_bytes(b"\x00\xffnot a state file" if damage == "garbage" else b"")
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / f"{_PREFIX}8")
    cli_latest = cli("list", str(tmp_path))
    assert f"{_PREFIX}8" in cli_latest.stdout
    report = run(tmp_path, "--num-steps", "2")
    assert (report["start"], report["end"]) == (8, 10)
    assert "no usable checkpoint state file" in report["stderr"]
    assert on_disk(tmp_path) == listed(tmp_path) == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("damage", ["manifest deleted", "data file corrupted"])
def test_a_damaged_checkpoint_is_skipped_and_replaced_when_training_gets_there(
    tmp_path: Path, damage: str
) -> None:
    run(tmp_path, "--num-steps", "10")
    newest = tmp_path / f"{_PREFIX}10"
    if damage == "manifest deleted":
        (newest / "manifest.json").unlink()
    else:
        data = next(newest.glob("data-*.safetensors"))
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
    for _ in range(3):  # every restart: skip the damaged one, train, replace it
        report = run(tmp_path, "--last-step", "10")
        assert (report["start"], report["end"]) == (8, 10)
        assert "skipped" in report["stderr"]
        with th.load_checkpoint(str(newest)) as reader:
            assert reader.get_tensor("global_step") == 10
        if damage == "manifest deleted":
            break
        # Damage it again for the next restart.
        data = next(newest.glob("data-*.safetensors"))
        raw = bytearray(data.read_bytes())
        raw[-1] ^= 0xFF
        data.write_bytes(bytes(raw))
    assert on_disk(tmp_path) == [2, 4, 6, 8, 10]


def test_a_finished_job_requeued_runs_no_step_and_writes_no_checkpoint(
    tmp_path: Path,
) -> None:
    first = run(tmp_path, "--last-step", "10", "--save-steps", "4")
    assert (first["start"], first["end"], first["ran"]) == (0, 10, 10)
    before = (on_disk(tmp_path), listed(tmp_path))
    again = run(tmp_path, "--last-step", "10", "--save-steps", "4")
    assert (again["start"], again["end"], again["ran"]) == (10, 10, 0)
    assert again["preempted"] is False
    assert (on_disk(tmp_path), listed(tmp_path)) == before
    np.testing.assert_array_equal(th.load_variable(str(tmp_path), "w"), np.full(16, 10.0))


def test_a_preempted_run_says_so_and_can_exit_for_a_requeue(tmp_path: Path) -> None:
    preempted = run(tmp_path, "--last-step", "100", "--save-steps", "50", "--sigterm-at", "3")
    assert preempted["preempted"] is True
    assert preempted["end"] == 3
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / f"{_PREFIX}3")

    # With exit_on_preemption the process reports the signal after its clean close...
    run(
        tmp_path,
        "--last-step",
        "100",
        "--save-steps",
        "50",
        "--sigterm-at",
        "5",
        "--exit-on-preemption",
        expect_rc=128 + signal.SIGTERM,
    )
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / f"{_PREFIX}5")
    # ... and a run that finishes exits 0 and is not "preempted".
    finished = run(tmp_path, "--last-step", "7", "--exit-on-preemption")
    assert (finished["start"], finished["end"], finished["preempted"]) == (5, 7, False)
