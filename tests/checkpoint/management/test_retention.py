"""Retention across restarts: ``keep_checkpoint_every_n_hours`` follows the job, not the process.

A job restarted every 50 minutes with ``keep_checkpoint_every_n_hours=1`` must still
keep one checkpoint per hour. Each "run" here is a new ``Saver`` that restores the
latest checkpoint as a restarted process does, on a clock that moves 10 minutes per
save; every checkpoint's files carry the time it was saved at, as on a real disk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.clock import FakeClock

from trainhooks.checkpoint.management.state_file import get_checkpoint_state
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session

MINUTE = 60.0


def _run(directory: Path, clock: FakeClock, saves: int, step: int) -> int:
    """One process's life: restore, then ``saves`` saves 10 minutes apart."""
    w = np.zeros(4)
    session = Session({"w": w})
    saver = Saver(max_to_keep=2, keep_checkpoint_every_n_hours=1.0, clock=clock)
    saver.restore_latest(session, str(directory))
    for _ in range(saves):
        clock.advance(10 * MINUTE)
        step += 1
        session.global_step = step
        prefix = saver.save(session, str(directory / "model.ckpt"), global_step=step)
        assert prefix is not None
        manifest = os.path.join(prefix, "manifest.json")
        os.utime(manifest, (clock(), clock()))  # the file's time is the time it was saved
    saver.close()
    return step


def _kept(directory: Path) -> list[int]:
    return sorted(int(n.rsplit("-", 1)[1]) for n in os.listdir(directory) if "ckpt-" in n)


def test_keep_every_n_hours_holds_across_restarts_shorter_than_n_hours(tmp_path: Path) -> None:
    clock = FakeClock()
    step = 0
    for _ in range(6):  # six runs of 50 minutes: five hours of training
        step = _run(tmp_path, clock, saves=5, step=step)
        clock.advance(MINUTE)  # the requeue
    kept = _kept(tmp_path)
    state = get_checkpoint_state(str(tmp_path))
    assert state is not None
    listed = [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]
    assert listed == [29, 30]
    kept_for_good = [s for s in kept if s not in listed]
    # One checkpoint per hour of training (the deadline steps from the previous one),
    # although no process lived an hour: 4 or 5 in five hours, not 0.
    assert 4 <= len(kept_for_good) <= 5, kept_for_good
    gaps = np.diff(kept_for_good)
    assert all(5 <= g <= 7 for g in gaps), kept_for_good  # about 6 saves (an hour) apart
    assert state.last_preserved_timestamp > 0


def test_a_fresh_process_clock_would_keep_nothing(tmp_path: Path) -> None:
    # What the resumed clock prevents: the same schedule without the state file's
    # last_preserved_timestamp keeps nothing for good, since no process lives an hour.
    clock = FakeClock()
    step = 0
    for _ in range(6):
        step = _run(tmp_path, clock, saves=5, step=step)
        text = (tmp_path / "checkpoint").read_text()
        lines = [line for line in text.splitlines() if "last_preserved" not in line]
        (tmp_path / "checkpoint").write_text("\n".join(lines) + "\n")
        clock.advance(MINUTE)
    assert _kept(tmp_path) == [29, 30]


def test_one_checkpoint_spelled_two_ways_is_tracked_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Saved as "model.ckpt-N" from the working directory, listed by the state file as
    # "./model.ckpt-N": the same checkpoints, so max_to_keep=2 keeps exactly two.
    monkeypatch.chdir(tmp_path)
    saver = Saver(max_to_keep=2)
    session = Session({"w": np.zeros(2)})
    for step in range(1, 5):
        saver.save(session, "model.ckpt", global_step=step)
    assert _kept(tmp_path) == [3, 4]
    state = get_checkpoint_state(".")
    assert state is not None
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        "model.ckpt-3",
        "model.ckpt-4",
    ]


def test_a_keep_clock_resumed_after_a_long_pause_keeps_one_per_period(tmp_path: Path) -> None:
    clock = FakeClock()
    step = _run(tmp_path, clock, saves=5, step=0)
    clock.advance(50 * 3600)  # the job stood still for two days
    step = _run(tmp_path, clock, saves=12, step=step)  # two hours of saves
    kept_for_good = [s for s in _kept(tmp_path) if s < step - 1 and s > 5]
    # Not every checkpoint of the two hours (12 of them): about one per hour. The
    # deadline resumes one hour back and steps on from there, as TF's does, so the first
    # hour may keep one checkpoint more.
    assert 2 <= len(kept_for_good) <= 3, kept_for_good
