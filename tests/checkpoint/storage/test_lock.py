"""The writer lock of a checkpoint directory: one writing process, readers never blocked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import trainhooks as th
from trainhooks import errors
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.storage.lock import (
    LOCK_FILE_NAME,
    CheckpointDirLockedError,
    acquire_writer_lock,
    lock_holder,
)
from trainhooks.session.session import Session

_HOLDER = """
import sys
from trainhooks.checkpoint.storage.lock import acquire_writer_lock
lock = acquire_writer_lock(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
sys.stdin.readline()
"""

_SAVE = """
import sys
import numpy as np
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session
Saver().save(Session({"w": np.ones(3)}), sys.argv[1] + "/model.ckpt", global_step=7)
"""

_MTS = """
import sys
import numpy as np
import trainhooks as th
with th.MonitoredTrainingSession(
    checkpoint_dir=sys.argv[1], state={"w": np.ones(3)}, save_checkpoint_steps=1,
    save_summaries_steps=0, log_step_count_steps=0,
) as sess:
    print("open", flush=True)
    sys.stdin.readline()
"""


@contextmanager
def holder(directory: Path, program: str = _HOLDER) -> Iterator[subprocess.Popen[str]]:
    """A real second process that takes the lock and waits on stdin."""
    proc = subprocess.Popen(
        [sys.executable, "-c", program, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() in ("held", "open"), proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        proc.kill()
        proc.communicate()


def test_second_process_gets_an_error_naming_the_directory_and_holder(tmp_path: Path) -> None:
    with holder(tmp_path) as proc, pytest.raises(CheckpointDirLockedError) as info:
        acquire_writer_lock(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert f"process {proc.pid}" in str(info.value)
    assert info.value.holder_pid == proc.pid
    assert info.value.directory == str(tmp_path)
    assert isinstance(info.value, errors.Error)


def test_lock_is_free_again_after_release_and_after_sigkill(tmp_path: Path) -> None:
    with holder(tmp_path) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"
        acquire_writer_lock(tmp_path).release()
    with holder(tmp_path) as proc:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # The kernel drops a dead process's flock: a crash never leaves the directory locked.
        lock = acquire_writer_lock(tmp_path)
        assert lock_holder(tmp_path) == os.getpid()
        lock.release()


def test_lock_is_shared_within_a_process_until_the_last_handle_goes(tmp_path: Path) -> None:
    first = acquire_writer_lock(tmp_path)
    second = acquire_writer_lock(tmp_path)
    first.release()
    first.release()  # twice is harmless
    with pytest.raises(CheckpointDirLockedError):
        _try_lock_in_child(tmp_path)
    second.release()
    _try_lock_in_child(tmp_path)


def _try_lock_in_child(directory: Path) -> None:
    code = (
        "import sys\nfrom trainhooks.checkpoint.storage.lock import acquire_writer_lock\n"
        "from trainhooks.checkpoint.storage.lock import CheckpointDirLockedError\n"
        "try:\n    acquire_writer_lock(sys.argv[1])\n"
        "except CheckpointDirLockedError as e:\n    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True)
    if proc.returncode == 3:
        raise CheckpointDirLockedError(proc.stdout.decode(), str(directory), None)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
# Once a test of the same process has imported JAX, JAX warns at every fork; the child
# here only tries the lock and never touches JAX.
@pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")
def test_forked_child_does_not_inherit_the_hold(tmp_path: Path) -> None:
    lock = acquire_writer_lock(tmp_path)
    pid = os.fork()
    if pid == 0:  # the child: must be refused, not share the parent's lock
        try:
            acquire_writer_lock(tmp_path)
        except CheckpointDirLockedError:
            os._exit(3)
        except BaseException:
            os._exit(4)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    lock.release()
    assert os.waitstatus_to_exitcode(status) == 3


def test_readers_never_take_the_lock(tmp_path: Path) -> None:
    Saver().save(Session({"w": np.arange(3.0)}), str(tmp_path / "model.ckpt"), global_step=4)
    with holder(tmp_path):
        sess = Session({"w": np.zeros(3)})
        assert Saver().restore_latest(sess, tmp_path) == str(tmp_path / "model.ckpt-4")
        np.testing.assert_array_equal(sess.state["w"], np.arange(3.0))
        assert th.latest_checkpoint(tmp_path) == str(tmp_path / "model.ckpt-4")
        assert th.load_checkpoint(str(tmp_path)).get_tensor("w").tolist() == [0.0, 1.0, 2.0]


@pytest.mark.slow  # a second process trains
def test_monitored_training_session_refuses_a_directory_another_process_writes(
    tmp_path: Path,
) -> None:
    with holder(tmp_path, _MTS) as proc:
        pid = proc.pid
        with pytest.raises(CheckpointDirLockedError) as info:
            th.MonitoredTrainingSession(
                checkpoint_dir=str(tmp_path),
                state={"w": np.ones(3)},
                save_checkpoint_steps=1,
                save_summaries_steps=0,
                log_step_count_steps=0,
            )
    assert f"process {pid}" in str(info.value)
    # The other process is gone: this one may write now, and releases on close.
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(tmp_path),
        state={"w": np.ones(3)},
        save_checkpoint_steps=1,
        save_summaries_steps=0,
        log_step_count_steps=0,
    ) as sess:
        sess.run(lambda: None)
    _try_lock_in_child(tmp_path)


def test_non_chief_and_readonly_sessions_do_not_lock(tmp_path: Path) -> None:
    with holder(tmp_path):
        with th.MonitoredTrainingSession(
            is_chief=False, checkpoint_dir=str(tmp_path), state={"w": np.ones(3)}
        ) as sess:
            sess.run(lambda: None)
        with th.SingularMonitoredSession(
            checkpoint_dir=str(tmp_path), state={"w": np.ones(3)}
        ) as sess:
            sess.run(lambda: None)


@pytest.mark.slow  # two processes save into one directory
def test_saver_in_a_second_process_gets_a_clear_error(tmp_path: Path) -> None:
    with holder(tmp_path) as proc:
        run = subprocess.run([sys.executable, "-c", _SAVE, str(tmp_path)], capture_output=True)
    assert run.returncode != 0
    assert b"CheckpointDirLockedError" in run.stderr
    assert f"process {proc.pid}".encode() in run.stderr
    assert not (tmp_path / "model.ckpt-7").exists()


def test_hostile_lock_file_is_refused_without_blocking(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_text("not yours")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / LOCK_FILE_NAME).symlink_to(outside)
    with pytest.raises(errors.InvalidArgumentError, match="symbolic link"):
        acquire_writer_lock(ckpt)
    assert outside.read_text() == "not yours"
    (ckpt / LOCK_FILE_NAME).unlink()
    os.mkfifo(ckpt / LOCK_FILE_NAME)
    assert lock_holder(ckpt) is None  # a FIFO would block a plain open()
    with pytest.raises(errors.InvalidArgumentError, match="not a regular file"):
        acquire_writer_lock(ckpt)


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFoundError, match="nope"):
        acquire_writer_lock(tmp_path / "nope")


def test_a_release_from_a_finalizer_inside_acquire_does_not_deadlock(tmp_path: Path) -> None:
    """A saver collected by the GC while another saver takes a lock releases its lock from
    inside ``acquire_writer_lock`` on the same thread (seen as a hung test run)."""
    import threading

    from trainhooks.checkpoint.storage import lock as lock_module

    (tmp_path / "a").mkdir()
    held = lock_module.acquire_writer_lock(tmp_path / "a")
    done = threading.Event()

    def release_while_registry_is_held() -> None:
        with lock_module._registry_lock:  # where a GC finalizer would run
            held.release()
        done.set()

    worker = threading.Thread(target=release_while_registry_is_held, daemon=True)
    worker.start()
    assert done.wait(timeout=10), "release deadlocked inside the registry lock"
    assert held.released
