"""Hostile checkpoints and state files are refused before any large allocation or outside read.

Every attack (one test each; ``SECURITY.md`` lists them) starts from a valid checkpoint
and rewrites it the way an attacker could, resealing the manifest's checksum (it guards
against corruption, not forgery). Each must raise the library's error (``DataLossError``,
``NotFoundError``), with

* no open of any file outside the checkpoint directory (watched with inotify);
* a peak of Python allocations (``tracemalloc``, which NumPy reports to) far below what
  the file claims;
* no hang on a FIFO planted under a checkpoint file's name;
* no unpickling, ever (an audit hook watches ``pickle.find_class``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainhooks import errors
from trainhooks.checkpoint.format.manifest import MANIFEST_NAME, seal_manifest
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.management.state_file import get_checkpoint_state
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session

DATA = "data-00000-of-00001.safetensors"
_LIMIT = 16 * 2**20  # "no large allocation": 16 MiB of Python allocations at most


# ---- instruments ---------------------------------------------------------------------------

_AUDIT: list[tuple[str, tuple[Any, ...]]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _AUDIT is not None and event == "pickle.find_class":
        _AUDIT.append((event, args))


sys.addaudithook(_audit)


@contextmanager
def no_unpickling() -> Iterator[None]:
    global _AUDIT
    _AUDIT = []
    try:
        yield
    finally:
        seen, _AUDIT = _AUDIT, None
    assert seen == [], f"something was unpickled: {seen}"


class _Inotify:
    """Linux inotify on one directory: did anything open or read a file in it?"""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK)
        if (
            self.fd < 0
            or libc.inotify_add_watch(
                self.fd, os.fsencode(directory), self.IN_ACCESS | self.IN_OPEN
            )
            < 0
        ):
            pytest.skip("inotify is not available")

    def events(self) -> int:
        count = 0
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return count
            offset = 0
            while offset < len(buf):
                _, _, _, length = struct.unpack_from("iIII", buf, offset)
                offset += 16 + length
                count += 1

    def close(self) -> None:
        os.close(self.fd)


@contextmanager
def nothing_outside_opened(outside: Path) -> Iterator[None]:
    if not sys.platform.startswith("linux"):
        yield
        return
    watch = _Inotify(outside)
    try:
        yield
        assert watch.events() == 0, f"a file in {outside} was opened or read"
    finally:
        watch.close()


@contextmanager
def peak_allocation_below(limit: int = _LIMIT) -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"allocated {peak} bytes"


def _refused(call: Callable[[], Any], *kinds: type[BaseException]) -> BaseException:
    kinds = kinds or (errors.DataLossError,)
    with no_unpickling(), pytest.raises(kinds) as info:
        call()
    assert isinstance(info.value, errors.Error)
    return info.value


def _no_hang(call: Callable[[], Any], fifo: Path, seconds: float = 2) -> BaseException | None:
    """Run ``call``; if it blocks on ``fifo``, unblock it, and fail."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # lets the blocked open() return
        os.close(fd)
        thread.join(seconds)
        pytest.fail(f"opening the checkpoint blocked on the FIFO {fifo.name}")
    return outcome[0]


# ---- a valid checkpoint to start from --------------------------------------------------------


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """``tmp_path/run/model.ckpt-3`` (listed in ``run/checkpoint``); ``tmp_path/outside`` exists."""
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "outside").mkdir()
    state = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2)}
    Saver().save(Session(state, global_step=3), str(run / "model.ckpt"), global_step=3)
    return run / "model.ckpt-3"


def _doc(prefix: Path) -> dict[str, Any]:
    doc = json.loads((prefix / MANIFEST_NAME).read_bytes())
    del doc["manifest_checksum"]
    return doc


def _write_manifest(prefix: Path, doc: dict[str, Any] | str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    path = prefix / MANIFEST_NAME
    path.unlink()
    path.write_bytes(seal_manifest(text.encode()))


def _rename_file(prefix: Path, doc: dict[str, Any], new: str) -> dict[str, Any]:
    doc["files"] = {new: doc["files"][DATA]}
    return doc


# ---- paths outside the directory, symlinks -------------------------------------------------


@pytest.mark.parametrize("name", ["../../outside/" + DATA, "ABSOLUTE", "..", "sub/" + DATA])
def test_manifest_naming_a_file_outside_the_directory(ckpt: Path, name: str) -> None:
    outside = ckpt.parent.parent / "outside"
    (outside / DATA).write_bytes((ckpt / DATA).read_bytes())  # a perfectly valid file
    if name == "ABSOLUTE":
        name = str(outside / DATA)
    _write_manifest(ckpt, _rename_file(ckpt, _doc(ckpt), name))
    with nothing_outside_opened(outside):
        error = _refused(lambda: open_checkpoint(ckpt))
    assert "not a plain file name" in str(error)


@pytest.mark.parametrize("which", [DATA, MANIFEST_NAME])
def test_symlinked_files_are_not_followed(ckpt: Path, which: str) -> None:
    outside = ckpt.parent.parent / "outside"
    (outside / which).write_bytes((ckpt / which).read_bytes())
    (ckpt / which).unlink()
    (ckpt / which).symlink_to(outside / which)
    with nothing_outside_opened(outside):
        _refused(lambda: open_checkpoint(ckpt))
        _refused(
            lambda: Saver().restore(Session({"w": np.zeros((3, 4)), "b": np.zeros(2)}), str(ckpt))
        )


def test_symlinked_checkpoint_directory_is_not_restored(ckpt: Path) -> None:
    run, outside = ckpt.parent, ckpt.parent.parent / "outside"
    os.rename(ckpt, outside / ckpt.name)
    ckpt.symlink_to(outside / ckpt.name)
    with nothing_outside_opened(outside), pytest.raises(ValueError, match="not a valid checkpoint"):
        Saver().restore_latest(Session({"w": np.zeros((3, 4)), "b": np.zeros(2)}), str(run))


@pytest.mark.parametrize("form", ["absolute", "relative"])
def test_state_file_naming_a_checkpoint_outside_the_directory(ckpt: Path, form: str) -> None:
    run, outside = ckpt.parent, ckpt.parent.parent / "outside"
    elsewhere = Session({"w": np.full((3, 4), 9.0, np.float32), "b": np.zeros(2)}, global_step=9)
    Saver().save(elsewhere, str(outside / "model.ckpt"), global_step=9)
    target = str(outside / "model.ckpt-9") if form == "absolute" else "../outside/model.ckpt-9"
    (run / "checkpoint").write_text(
        f'model_checkpoint_path: "{target}"\nall_model_checkpoint_paths: "{target}"\n'
    )
    sess = Session({"w": np.zeros((3, 4), np.float32), "b": np.zeros(2)})
    with nothing_outside_opened(outside):
        try:
            Saver().restore_latest(sess, str(run))
        except (ValueError, errors.Error):
            pass
    assert sess.global_step == 0
    assert not sess.state["w"].any()


# ---- absurd sizes, shapes and header lengths ---------------------------------------------------


def test_absurd_header_length_is_refused_without_allocating(ckpt: Path) -> None:
    data = bytearray((ckpt / DATA).read_bytes())
    data[:8] = struct.pack("<Q", 2**64 - 1)
    (ckpt / DATA).write_bytes(bytes(data))
    with peak_allocation_below():
        error = _refused(lambda: open_checkpoint(ckpt))
    assert "header length" in str(error)


def test_large_claimed_header_is_refused_before_it_is_copied(ckpt: Path) -> None:
    # A consistent forgery: the manifest, the length prefix and the tensors' byte ranges
    # all agree on a 90 MiB header (sparse on disk); only its bytes are junk.
    doc = _doc(ckpt)
    data = (ckpt / DATA).read_bytes()
    old_start = doc["files"][DATA]["data_start"]
    claimed = 90 * 2**20
    shift = 8 + claimed - old_start
    doc["files"][DATA].update(size=len(data) + shift, data_start=old_start + shift)
    with open(ckpt / DATA, "r+b") as f:
        f.write(struct.pack("<Q", claimed))
        f.seek(old_start + shift)
        f.write(data[old_start:])
    _write_manifest(ckpt, doc)
    with peak_allocation_below():
        _refused(lambda: open_checkpoint(ckpt))


@pytest.mark.parametrize(
    "shape", [[2**40, 2**40], [2**63 - 1], [-1, 4], [True, 4], [1.5], "12", [[3]], [1] * 65]
)
def test_absurd_shapes_are_refused_without_allocating(ckpt: Path, shape: Any) -> None:
    doc = _doc(ckpt)
    columns = doc["files"][DATA]
    columns["shapes"][columns["tensors"].index("w")] = shape
    _write_manifest(ckpt, doc)
    with peak_allocation_below():
        error = _refused(lambda: open_checkpoint(ckpt))
    assert "'w'" in str(error)


@pytest.mark.parametrize("size", [2**62, 2**64 + 5, 0, -8])
def test_absurd_file_sizes_are_refused(ckpt: Path, size: int) -> None:
    doc = _doc(ckpt)
    doc["files"][DATA]["size"] = size
    _write_manifest(ckpt, doc)
    with peak_allocation_below():
        _refused(lambda: open_checkpoint(ckpt))


def test_manifest_beyond_the_size_cap_is_refused_unread(ckpt: Path) -> None:
    with open(ckpt / MANIFEST_NAME, "r+b") as f:
        f.truncate(3 * 2**30)  # sparse
    with peak_allocation_below():
        error = _refused(lambda: open_checkpoint(ckpt))
    assert "too large" in str(error)


def test_large_junk_manifest_is_refused_without_reading_it_all(ckpt: Path) -> None:
    with open(ckpt / MANIFEST_NAME, "r+b") as f:
        f.truncate(300 * 2**20)  # sparse
    with peak_allocation_below(64 * 2**20):
        _refused(lambda: open_checkpoint(ckpt))


def test_huge_state_file_is_not_read_whole(ckpt: Path) -> None:
    with open(ckpt.parent / "checkpoint", "r+b") as f:
        f.truncate(256 * 2**20)
    with peak_allocation_below():
        get_checkpoint_state(ckpt.parent)


# ---- duplicate names ----------------------------------------------------------------------------


def test_duplicate_keys_in_the_manifest_are_refused(ckpt: Path) -> None:
    text = json.dumps(_doc(ckpt), separators=(",", ":"))
    twice = _doc(ckpt)
    columns = twice["files"][DATA]  # "w" listed twice, its bytes once
    at = columns["tensors"].index("w")
    for field in ("tensors", "dtypes", "shapes"):
        columns[field].insert(at, columns[field][at])
    columns["checksums"].insert(0, [1, "0" * 32])
    _write_manifest(ckpt, twice)
    error = _refused(lambda: open_checkpoint(ckpt))
    assert "duplicate tensor name 'w'" in str(error)
    _write_manifest(ckpt, text[:-1] + ',"global_step":4}')
    assert "duplicate key 'global_step'" in str(_refused(lambda: open_checkpoint(ckpt)))


def test_duplicate_names_in_a_data_file_header_are_refused(ckpt: Path) -> None:
    data = (ckpt / DATA).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + length]
    # Rename "b" to "w" in place: same length, a header with "w" twice.
    forged = header.replace(b'"b":', b'"w":', 1)
    assert forged != header
    (ckpt / DATA).write_bytes(data[:8] + forged + data[8 + length :])
    error = _refused(lambda: open_checkpoint(ckpt))
    assert "header" in str(error)


# ---- truncated anywhere -------------------------------------------------------------------------


@pytest.mark.parametrize("which", [MANIFEST_NAME, DATA])
def test_truncation_at_every_length_is_refused(ckpt: Path, which: str) -> None:
    original = (ckpt / which).read_bytes()
    for length in range(len(original)):
        (ckpt / which).write_bytes(original[:length])
        _refused(lambda: open_checkpoint(ckpt).verify())
    (ckpt / which).write_bytes(original)
    open_checkpoint(ckpt).verify()


# ---- hostile structure and special files ----------------------------------------------------------


def test_deeply_nested_tree_json_is_refused_with_the_library_error(ckpt: Path) -> None:
    text = json.dumps(_doc(ckpt), separators=(",", ":"))
    text = text.replace('"tree":', '"tree":' + "[" * 100_000 + "]" * 100_000 + ',"x":', 1)
    _write_manifest(ckpt, text)
    _refused(lambda: open_checkpoint(ckpt))


@pytest.mark.parametrize(
    "which",
    [
        DATA,
        MANIFEST_NAME,
        "checkpoint",
    ],
)
def test_a_fifo_in_place_of_a_file_does_not_hang_the_reader(ckpt: Path, which: str) -> None:
    path = (ckpt.parent if which == "checkpoint" else ckpt) / which
    path.unlink()
    os.mkfifo(path)
    sess = Session({"w": np.zeros((3, 4), np.float32), "b": np.zeros(2)})
    outcome = _no_hang(lambda: Saver().restore_latest(sess, str(ckpt.parent)), path)
    assert outcome is None or isinstance(outcome, (errors.Error, ValueError))


@pytest.mark.slow  # torch saves and restores under an audit hook
def test_restoring_a_torch_state_never_unpickles(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    Saver().save(Session({"m": model, "o": opt}), str(tmp_path / "model.ckpt"), global_step=1)
    fresh = torch.nn.Linear(3, 2)
    with no_unpickling():
        fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
        Saver().restore_latest(Session({"m": fresh, "o": fresh_opt}), str(tmp_path))
    assert torch.equal(fresh.weight, model.weight)
