"""Damage on disk is detected on restore, every time: bit flips, truncation, deleted files.

A checkpoint of a real PyTorch model, optimizer and NumPy arrays, split over several data
files, is damaged at random (seeded) places. Every time, ``Saver.restore`` refuses it
with ``DataLossError`` (or, for a missing manifest, "not a valid checkpoint") and leaves
the user's objects untouched, and ``restore_latest`` falls back to the previous
checkpoint bit for bit, with a warning naming the one it skipped and why.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainhooks import errors
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session

torch = pytest.importorskip("torch")

TRIALS = {"bit_flip": 200, "truncate": 100}


def _state(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "table": np.arange(40, dtype=np.int32) * seed}


_STEP_1: list[bytes] = []


def _fingerprint(state: dict[str, Any]) -> list[bytes]:
    out = [t.detach().numpy().tobytes() for t in state["model"].state_dict().values()]
    for group in state["opt"].state.values():
        out += [v.numpy().tobytes() for v in group.values() if torch.is_tensor(v)]
    return [*out, state["table"].tobytes()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Checkpoints of step 1 and step 2 (each several data files) and step 2's files."""
    directory = tmp_path_factory.mktemp("run")
    saver = Saver(max_shard_bytes=256)
    for step in (1, 2):
        saver.save(Session(_state(step), global_step=step), str(directory / "model.ckpt"), step)
    files = sorted((directory / "model.ckpt-2").iterdir())
    assert len(files) >= 3  # the manifest and at least two data files
    return directory, files


def _expect_detected(directory: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    prefix = str(directory / "model.ckpt-2")
    state = _state(7)
    before = _fingerprint(state)
    with pytest.raises((errors.DataLossError, ValueError)) as info:
        Saver().restore(Session(state), prefix)
    assert prefix in str(info.value), damage
    assert _fingerprint(state) == before, f"{damage}: the state was changed"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainhooks.checkpoint.saver"):
        sess = Session(state)
        assert Saver().restore_latest(sess, str(directory)) == str(directory / "model.ckpt-1")
    assert sess.global_step == 1
    if not _STEP_1:
        _STEP_1.extend(_fingerprint(_state(1)))
    assert _fingerprint(state) == _STEP_1, damage
    assert prefix in caplog.text, damage


def _damaged(path: Path, change: Callable[[bytes], bytes | None]) -> Callable[[], None]:
    """Apply ``change`` to the file (None deletes it); returns the undo."""
    original = path.read_bytes()
    new = change(original)
    if new is None:
        path.unlink()
    else:
        path.write_bytes(new)

    def undo() -> None:
        path.write_bytes(original)

    return undo


@pytest.mark.slow  # 200 damaged checkpoints restored
def test_single_bit_flips_at_random_offsets_are_always_detected(
    run: tuple[Path, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    directory, files = run
    rng = random.Random(20240521)
    sizes = [f.stat().st_size for f in files]
    for _ in range(TRIALS["bit_flip"]):
        (path,) = rng.choices(files, weights=sizes)
        offset = rng.randrange(path.stat().st_size)
        bit = rng.randrange(8)

        def flip(data: bytes, offset: int = offset, bit: int = bit) -> bytes:
            return data[:offset] + bytes([data[offset] ^ (1 << bit)]) + data[offset + 1 :]

        undo = _damaged(path, flip)
        try:
            _expect_detected(directory, f"{path.name} byte {offset} bit {bit}", caplog)
        finally:
            undo()


@pytest.mark.slow  # 100 damaged checkpoints restored
def test_truncation_at_random_lengths_is_always_detected(
    run: tuple[Path, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    directory, files = run
    rng = random.Random(7)
    for _ in range(TRIALS["truncate"]):
        path = rng.choice(files)
        length = rng.randrange(path.stat().st_size)
        undo = _damaged(path, lambda data, n=length: data[:n])
        try:
            _expect_detected(directory, f"{path.name} cut to {length} bytes", caplog)
        finally:
            undo()


def test_deleted_files_are_always_detected(
    run: tuple[Path, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    directory, files = run
    for path in files:
        undo = _damaged(path, lambda data: None)
        try:
            _expect_detected(directory, f"{path.name} deleted", caplog)
        finally:
            undo()


def test_appended_bytes_and_swapped_files_are_detected(
    run: tuple[Path, list[Path]], caplog: pytest.LogCaptureFixture
) -> None:
    directory, files = run
    for path in files:
        undo = _damaged(path, lambda data: data + b"\0")
        try:
            _expect_detected(directory, f"{path.name} extended", caplog)
        finally:
            undo()
    # The same file name from the other checkpoint: well-formed, but not this checkpoint's.
    data_file = next(f for f in files if f.suffix == ".safetensors")
    other = directory / "model.ckpt-1" / data_file.name
    undo = _damaged(data_file, lambda data: other.read_bytes())
    try:
        _expect_detected(directory, f"{data_file.name} from step 1", caplog)
    finally:
        undo()


def test_the_undamaged_checkpoint_still_restores(run: tuple[Path, list[Path]]) -> None:
    directory, _ = run
    state = _state(7)
    Saver().restore(Session(state), str(directory / "model.ckpt-2"))
    assert _fingerprint(state) == _fingerprint(_state(2))
    assert os.path.isdir(directory / "model.ckpt-1")
