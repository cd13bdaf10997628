"""Kill a real training process with SIGKILL at random moments, then check the checkpoints.

Used by ``tests/checkpoint/test_crash.py`` (50 kills) and ``tools/crash_soak.py`` (500+).
Each round starts ``train_loop.py`` on the same directory (it restores the latest
checkpoint and saves every step), kills it with SIGKILL after a random delay, and then
checks, in this process:

* the state file names only checkpoints that exist and verify (every byte checksummed);
* the latest checkpoint restores bit for bit to :func:`train_loop.state_at` of its step;
* the latest step never goes back;
* the next start reports no leftovers of interrupted saves (``ready ... leftovers=0``).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_loop

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.management.state_file import get_checkpoint_state
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session

PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_loop.py")


@dataclass
class SoakResult:
    """What a crash loop did: kills, the phase each landed in, the steps reached."""

    kills: int = 0
    kills_before_ready: int = 0
    restores_checked: int = 0
    leftovers_seen_at_start: int = 0
    final_step: int = 0
    steps_at_kill: list[int] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.kills} SIGKILLs ({self.kills_before_ready} during start-up/restore), "
            f"{self.restores_checked} bit-exact restores checked, final step {self.final_step}, "
            f"starts with leftovers: {self.leftovers_seen_at_start}"
        )


def _bytes_of(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "w": state["w"].tobytes(),
        "v": state["v"].tobytes(),
        "meta": dict(state["meta"]),
    }


def check_directory(directory: str) -> int:
    """Assert every listed checkpoint verifies and the latest restores bit-exactly; its step."""
    ckpt = get_checkpoint_state(directory)
    if ckpt is None:
        return -1
    for prefix in ckpt.all_model_checkpoint_paths:
        with open_checkpoint(prefix) as reader:
            reader.verify()
    state = train_loop.initial_state()
    state["w"][:] = np.nan  # anything the restore fails to write shows
    state["v"][:] = np.nan
    sess = Session(state)
    Saver().restore(sess, ckpt.model_checkpoint_path)
    step = sess.global_step
    expected = train_loop.state_at(step)
    assert _bytes_of(state) == _bytes_of(expected), (
        f"{ckpt.model_checkpoint_path}: restored state differs from the state of step {step}"
    )
    assert state["meta"]["count"] == step
    return step


def _start(
    directory: str, mode: str, env: dict[str, str] | None = None, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, PROGRAM, directory, "--mode", mode, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env} if env else None,
    )


def _wait_for_step(proc: subprocess.Popen[str], step: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1]) >= step:
            return


def _wait_for_checkpoint_after(directory: str, step: int, timeout: float = 60.0) -> None:
    """Return once ``directory``'s state file lists a checkpoint newer than ``step``."""
    deadline = time.monotonic() + timeout
    while True:
        ckpt = get_checkpoint_state(directory)
        if ckpt is not None and int(ckpt.model_checkpoint_path.rsplit("-", 1)[1]) > step:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{directory}: no checkpoint newer than step {step} listed within {timeout:g} s"
            )
        time.sleep(0.05)


def _kill_at_random(
    proc: subprocess.Popen[str],
    rng: random.Random,
    result: SoakResult,
    max_delay_secs: float,
    early_kill_fraction: float,
    before_delay: Callable[[], None] | None = None,
) -> None:
    """SIGKILL ``proc`` during start-up, or after it is ready, ``before_delay()`` has
    returned and a random delay has passed."""
    assert proc.stdout is not None
    try:
        if rng.random() < early_kill_fraction:
            time.sleep(rng.uniform(0.0, 0.25))  # somewhere in start-up
            result.kills_before_ready += 1
        else:
            line = proc.stdout.readline()
            if not line.startswith("ready "):
                proc.kill()
                _, err = proc.communicate()
                raise AssertionError(f"training process did not start: {line!r}\n{err}")
            if line.split()[-1] != "leftovers=0":
                result.leftovers_seen_at_start += 1
            # Wait until two more steps are done (in both modes that means at least one
            # more committed save), so that every kill after start-up lands in steady
            # training and the loop makes progress however slow the machine is.
            _wait_for_step(proc, int(line.split()[1]) + 2)
            if before_delay is not None:
                before_delay()
            time.sleep(rng.uniform(0.0, max_delay_secs))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"exited on its own: {proc.returncode}"


def crash_loop(
    directory: str | Path,
    kills: int,
    *,
    mode: str = "mts",
    seed: int = 0,
    max_delay_secs: float = 0.08,
    early_kill_fraction: float = 0.2,
    env: dict[str, str] | None = None,
) -> SoakResult:
    """Start, SIGKILL and check ``kills`` times; raise AssertionError on any damage.

    Args:
      directory: the checkpoint directory (created; reused across rounds).
      kills: how many processes to kill.
      mode: ``"mts"`` (synchronous saves through MonitoredTrainingSession) or
        ``"async"`` (background saves).
      seed: seeds the kill moments.
      max_delay_secs: a kill lands uniformly in this window, after start-up and two more
        completed steps.
      early_kill_fraction: the fraction of kills that land during start-up instead
        (imports, restore, leftover removal, the first save).
      env: variables set for the training process on top of this one's (where an
        ``s3://`` directory's server is, say).
    """
    directory = os.fspath(directory)
    if "://" not in directory:
        os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    result = SoakResult()
    last_step = -1
    for _ in range(kills):
        with _start(directory, mode, env) as proc:
            _kill_at_random(proc, rng, result, max_delay_secs, early_kill_fraction)
        result.kills += 1
        step = check_directory(directory)
        result.restores_checked += step >= 0
        assert step >= last_step, f"the latest checkpoint went back from {last_step} to {step}"
        last_step = step
        result.steps_at_kill.append(step)
    # A last clean start must find no leftovers and resume from the last step.
    with _start(directory, mode, env) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.kill()
        proc.communicate()
    assert line.split()[1:] == [str(last_step), "leftovers=0"] or last_step < 0, line
    result.final_step = max(last_step, 0)
    return result


def upload_crash_loop(
    directory: str | Path, target: str, kills: int, *, seed: int = 0
) -> SoakResult:
    """:func:`crash_loop` for a process that uploads each checkpoint (``UploadListener``).

    Each kill lands while uploads run in the background (one starts at every step).
    After each, both the local directory and ``target`` are checked as
    :func:`check_directory` checks one (every listed checkpoint verifies, the latest
    restores bit for bit), and neither's latest step goes back. A last run to its end
    must upload its final checkpoint and leave ``target`` with no manifest-less prefix
    and no unfinished upload.

    The first 3 rounds kill only after ``target`` lists a checkpoint newer than the one
    the round before left there, so at least 3 distinct uploaded steps are checked
    however slow the machine is; the later rounds kill wherever the delay lands.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    rng = random.Random(seed)
    result = SoakResult()
    last = {directory: -1, target: -1}
    for round_ in range(kills):
        # Steps of 20 ms and kills up to 2 s in (the first upload starts about 0.5 s
        # after "ready", then one runs all the time): uploads commit between kills,
        # and kills cut others off part-way. On a busy machine an upload can take longer
        # than the whole window, so that alone would not make the uploads go on between
        # kills: the first rounds wait for a newer uploaded step before the delay (and
        # never kill during start-up; the draw is still made, so later kills land alike).
        waits = round_ < 3
        before_delay = partial(_wait_for_checkpoint_after, target, last[target]) if waits else None
        with _start(directory, "mts", None, "--upload", target, "--step-secs", "0.02") as proc:
            _kill_at_random(proc, rng, result, 2.0, 0.0 if waits else 0.1, before_delay)
        result.kills += 1
        for where in (directory, target):
            step = check_directory(where)
            assert step >= last[where], f"{where}: the latest went back to {step}"
            last[where] = step
        result.restores_checked += last[target] >= 0
        result.steps_at_kill.append(last[target])
    final = last[directory] + 3
    with _start(directory, "mts", None, "--upload", target, "--steps", str(final)) as proc:
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert check_directory(target) == final, out
    assert train_loop.leftovers(target) == []
    result.final_step = final
    return result
