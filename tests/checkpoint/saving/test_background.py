"""A background save runs at idle priority, so the training loop keeps the CPU."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.storage_doubles import PolicyRecordingStorage

from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.saving.background import BackgroundWriter, lower_thread_priority
from trainhooks.session.session import Session

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's"
)


def _poll_until_done(in_flight: Callable[[], object]) -> None:
    """Poll ``in_flight()`` until None, as a training loop does (wait() raises the priority)."""
    gate = threading.Event()
    # Fail, not hang; a job at idle priority waits out everything else a busy machine runs.
    end = time.monotonic() + 100
    while in_flight() is not None:
        if time.monotonic() > end:
            pytest.fail(f"still in flight after 100 s: {in_flight()!r}")
        gate.wait(0.001)


@linux_only
def test_jobs_and_the_threads_they_start_run_at_idle_priority() -> None:
    def job() -> tuple[int, list[int]]:
        with ThreadPoolExecutor(2) as pool:
            children = list(pool.map(lambda _: os.sched_getscheduler(0), range(2)))
        return os.sched_getscheduler(0), children

    writer: BackgroundWriter[tuple[int, list[int]]] = BackgroundWriter()
    writer.submit("job", job)
    _poll_until_done(lambda: writer.in_flight)
    assert writer.poll() == [(os.SCHED_IDLE, [os.SCHED_IDLE, os.SCHED_IDLE])]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller keeps its priority
    writer.close()


@linux_only
def test_idle_priority_can_be_turned_off() -> None:
    writer: BackgroundWriter[int] = BackgroundWriter(idle_priority=False)
    writer.submit("job", lambda: os.sched_getscheduler(0))
    writer.close()
    assert writer.poll() == [os.SCHED_OTHER]


@linux_only
def test_lower_thread_priority_changes_only_the_calling_thread() -> None:
    seen: list[tuple[bool, int]] = []
    thread = threading.Thread(
        target=lambda: seen.append((lower_thread_priority(), os.sched_getscheduler(0)))
    )
    thread.start()
    thread.join()
    assert seen == [(True, os.SCHED_IDLE)]
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


@linux_only
def test_background_save_writes_its_files_at_idle_priority(tmp_path: Path) -> None:
    state = {"w": np.arange(2**18, dtype=np.float32), "b": np.ones(2**18, np.float32)}
    (tmp_path / "bg").mkdir()
    (tmp_path / "fg").mkdir()
    background = PolicyRecordingStorage()
    saver = Saver(async_save=True, storage=background, max_shard_bytes=2**20)
    prefix = saver.save(Session(state), str(tmp_path / "bg" / "model.ckpt"), global_step=1)
    _poll_until_done(lambda: saver.pending)
    saver.close()
    assert prefix is not None and os.path.isdir(prefix)
    data_files = [n for n in background.policies if n.endswith(".safetensors")]
    assert len(data_files) >= 2 and "manifest.json" in background.policies  # written in parallel
    assert set(background.policies.values()) == {os.SCHED_IDLE}

    foreground = PolicyRecordingStorage()
    Saver(storage=foreground).save(Session(state), str(tmp_path / "fg" / "model.ckpt"))
    assert set(foreground.policies.values()) == {os.SCHED_OTHER}  # a sync save: full speed


def _can_leave_idle_priority() -> bool:
    """Whether this process may raise a thread from SCHED_IDLE (root, RLIMIT_NICE >= 20)."""
    result: list[bool] = []

    def probe() -> None:
        lower_thread_priority()
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except PermissionError:
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return result == [True]


def _policy_once_normal(deadline_s: float = 30.0) -> int:
    """This thread's policy, once it is SCHED_OTHER or after ``deadline_s`` (to fail, not hang)."""
    gate = threading.Event()
    end = time.monotonic() + deadline_s
    while os.sched_getscheduler(0) == os.SCHED_IDLE and time.monotonic() < end:
        gate.wait(0.001)
    return os.sched_getscheduler(0)


@linux_only
def test_waiting_for_a_job_returns_its_threads_to_normal_priority() -> None:
    if not _can_leave_idle_priority():
        pytest.skip("this process may not raise a thread's priority (RLIMIT_NICE)")
    started = threading.Event()

    def job() -> tuple[int, int, int]:
        first = os.sched_getscheduler(0)
        with ThreadPoolExecutor(1) as pool:
            helper = pool.submit(_policy_once_normal)  # started while the job is idle
            started.set()
            own = _policy_once_normal()
            return first, own, helper.result()

    writer: BackgroundWriter[tuple[int, int, int]] = BackgroundWriter()
    writer.submit("save", job)
    started.wait()
    writer.wait()  # the job and its helper thread now run at normal priority
    assert writer.poll() == [(os.SCHED_IDLE, os.SCHED_OTHER, os.SCHED_OTHER)]
    writer.close()


def test_saver_background_priority_option_is_checked_and_passed_on() -> None:
    from trainhooks.checkpoint.saver import Saver

    assert Saver(async_save=True)._writer._idle_priority is True
    assert Saver(async_save=True, background_priority="normal")._writer._idle_priority is False
    with pytest.raises(ValueError, match="background_priority must be 'idle' or 'normal'"):
        Saver(background_priority="low")  # type: ignore[arg-type]
