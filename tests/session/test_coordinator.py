"""Coordinator, with real threads (ported from TF's coordinator_test.py)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import pytest

from trainhooks import errors
from trainhooks.session.coordinator import Coordinator


def _start(target: Callable[[], None], name: str | None = None) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def test_stop_api() -> None:
    coord = Coordinator()
    assert not coord.should_stop()
    assert not coord.wait_for_stop(0.001)
    coord.request_stop()
    assert coord.should_stop()
    assert coord.wait_for_stop(0.001)


def test_stop_requested_from_another_thread_wakes_the_waiter() -> None:
    coord = Coordinator()
    thread = _start(coord.request_stop)
    assert coord.wait_for_stop(10)
    thread.join()
    assert coord.should_stop()


def test_join_waits_for_threads_that_end_on_stop() -> None:
    coord = Coordinator()
    finished: list[int] = []

    def worker(i: int) -> None:
        coord.wait_for_stop()
        finished.append(i)

    threads = [_start(lambda i=i: worker(i)) for i in range(3)]
    coord.request_stop()
    coord.join(threads)
    assert sorted(finished) == [0, 1, 2]
    assert coord.joined


def test_join_waits_for_threads_that_end_without_a_stop_request() -> None:
    coord = Coordinator()
    go = threading.Event()
    done: list[bool] = []

    def worker() -> None:
        go.wait()
        done.append(True)

    thread = _start(worker)
    go.set()
    coord.join([thread])
    assert done == [True]
    assert not coord.should_stop()


def test_join_all_registered_threads() -> None:
    coord = Coordinator()
    ended = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: ended.append(coord.wait_for_stop()))
        coord.register_thread(thread)
        thread.start()
    coord.request_stop()
    coord.join()
    assert ended == [True, True]


def test_join_registered_and_passed_threads() -> None:
    coord = Coordinator()
    registered = threading.Thread(target=coord.wait_for_stop)
    coord.register_thread(registered)
    registered.start()
    passed = _start(coord.wait_for_stop)
    coord.request_stop()
    coord.join([passed])
    assert not registered.is_alive()
    assert not passed.is_alive()


def test_join_raises_when_threads_outlive_the_grace_period() -> None:
    coord = Coordinator()
    release = threading.Event()
    straggler = _start(release.wait, name="stubborn-worker")
    coord.request_stop()
    try:
        with pytest.raises(RuntimeError, match="threads still running: stubborn-worker"):
            coord.join([straggler], stop_grace_period_secs=0.01)
    finally:
        release.set()
        straggler.join()


def test_join_ignore_live_threads_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    coord = Coordinator()
    release = threading.Event()
    straggler = _start(release.wait, name="slow-worker")
    coord.request_stop()
    try:
        with caplog.at_level("INFO", logger="trainhooks.session.coordinator"):
            coord.join([straggler], stop_grace_period_secs=0.01, ignore_live_threads=True)
    finally:
        release.set()
        straggler.join()
    assert "Coordinator stopped with threads still running: slow-worker" in caplog.text


def test_join_raises_the_first_reported_exception_as_exc_info() -> None:
    coord = Coordinator()

    def fail(message: str) -> None:
        try:
            raise RuntimeError(message)
        except RuntimeError:
            coord.request_stop(sys.exc_info())  # type: ignore[arg-type]

    first = _start(lambda: fail("First"))
    first.join()
    second = _start(lambda: fail("Second"))
    second.join()
    with pytest.raises(RuntimeError, match="First"):
        coord.join([first, second])


def test_join_raises_a_reported_exception_object() -> None:
    coord = Coordinator()
    thread = _start(lambda: coord.request_stop(ValueError("Bad value in worker")))
    with pytest.raises(ValueError, match="Bad value in worker"):
        coord.join([thread])


def test_stop_on_exception_reports_the_error() -> None:
    coord = Coordinator()

    def worker() -> None:
        with coord.stop_on_exception():
            raise ValueError("Clean up failed")

    thread = _start(worker)
    with pytest.raises(ValueError, match="Clean up failed"):
        coord.join([thread])


def test_out_of_range_is_a_clean_stop_by_default() -> None:
    coord = Coordinator()
    thread = _start(lambda: coord.request_stop(errors.OutOfRangeError("input done")))
    coord.join([thread])
    assert coord.should_stop()


def test_custom_clean_stop_exception_types() -> None:
    coord = Coordinator(clean_stop_exception_types=(ValueError,))
    assert coord.clean_stop_exception_types == (ValueError,)
    thread = _start(lambda: coord.request_stop(ValueError("expected")))
    coord.join([thread])
    assert coord.should_stop()


def test_monitored_session_style_coordinator_reports_out_of_range() -> None:
    coord = Coordinator(clean_stop_exception_types=[])
    coord.request_stop(errors.OutOfRangeError("end of input"))
    with pytest.raises(errors.OutOfRangeError):
        coord.raise_requested_exception()


def test_raise_requested_exception() -> None:
    coord = Coordinator()
    coord.raise_requested_exception()  # nothing reported: no error
    coord.request_stop(errors.AbortedError("preempted"))
    with pytest.raises(errors.AbortedError, match="preempted"):
        coord.raise_requested_exception()


def test_only_the_first_exception_is_kept() -> None:
    coord = Coordinator()
    coord.request_stop(ValueError("first"))
    coord.request_stop(KeyError("second"))
    with pytest.raises(ValueError, match="first"):
        coord.raise_requested_exception()


def test_clear_stop_clears_the_exception_too() -> None:
    coord = Coordinator()
    coord.request_stop(RuntimeError("First"))
    coord.clear_stop()
    assert not coord.should_stop()
    coord.raise_requested_exception()
    coord.join([])


def test_request_stop_raises_once_joined() -> None:
    coord = Coordinator()
    coord.join([])
    with pytest.raises(RuntimeError, match="late"):
        coord.request_stop(RuntimeError("late"))
    coord.request_stop()  # no exception: fine
    assert coord.should_stop()


def test_request_stop_raises_exc_info_once_joined() -> None:
    coord = Coordinator()
    coord.join([])
    try:
        raise RuntimeError("late exc_info")
    except RuntimeError:
        with pytest.raises(RuntimeError, match="late exc_info"):
            coord.request_stop(sys.exc_info())  # type: ignore[arg-type]


def test_request_stop_refuses_a_non_exception() -> None:
    coord = Coordinator()
    with pytest.raises(ValueError, match="ex must be an exception"):
        coord.request_stop("boom")  # type: ignore[arg-type]


def test_threads_loop_until_stop_requested_from_main() -> None:
    coord = Coordinator()
    counts = [0, 0]
    started = threading.Barrier(3)

    def worker(i: int) -> None:
        counts[i] += 1
        started.wait()  # every worker has done one iteration before the stop request
        while not coord.should_stop():
            counts[i] += 1
            coord.wait_for_stop(0.001)

    threads = [_start(lambda i=i: worker(i)) for i in range(2)]
    started.wait()
    coord.request_stop()
    coord.join(threads, stop_grace_period_secs=10)
    assert all(not t.is_alive() for t in threads)
    assert all(c >= 1 for c in counts)
