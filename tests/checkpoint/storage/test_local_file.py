"""LocalFile: every byte lands in order, whether written through the cache or with O_DIRECT."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.saving.background import lower_thread_priority
from trainhooks.checkpoint.storage import DIRECT_CHUNK_BYTES, LocalFile
from trainhooks.session.session import Session

CHUNK = DIRECT_CHUNK_BYTES


def _random_bytes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def _o_direct_works(directory: Path) -> bool:
    """Whether this file system takes O_DIRECT writes (tmpfs before Linux 6.6 does not)."""
    if not hasattr(os, "O_DIRECT"):
        return False
    try:
        fd = os.open(directory / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.remove(directory / ".probe")
    return True


def _directories(tmp_path: Path) -> list[Path]:
    """The test's directory, and one on tmpfs where there is one."""
    out = [tmp_path]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        out.append(Path(tempfile.mkdtemp(dir="/dev/shm")))
    return out


@pytest.mark.parametrize(
    "sizes",
    [
        [],  # an empty file
        [0, 5, 0],
        [24, 4096, 5000],  # a manifest-sized file: written when synced
        [CHUNK],  # exactly one chunk
        [CHUNK - 1, 2],  # the second chunk starts one byte into the second buffer
        [13, 3 * CHUNK + 4095],  # unaligned header, then a tensor spanning 4 chunks
        [8, 2**20 + 3, 2**20 - 3, CHUNK, 17, 2 * CHUNK + 1],
        [4096] * 2100,  # more than IOV_MAX small buffers, past the first chunk
    ],
    ids=lambda sizes: f"{len(sizes)}buf-{sum(sizes)}B",
)
def test_written_bytes_read_back_exactly(tmp_path: Path, sizes: list[int]) -> None:
    for directory in _directories(tmp_path):
        data = [_random_bytes(n, seed) for seed, n in enumerate(sizes)]
        # bytes, 1-d views and multi-dimensional views of other formats, as callers pass
        buffers: list[memoryview | bytes] = []
        for i, a in enumerate(data):
            if i % 3 == 0:
                buffers.append(a.tobytes())
            elif i % 3 == 1 or a.nbytes % 4:
                buffers.append(memoryview(a))
            else:
                buffers.append(memoryview(a.view(np.float32).reshape(2, -1)))
        path = directory / "file.bin"
        f = LocalFile(str(path))
        for start in range(0, len(buffers), 1000):
            f.write(buffers[start : start + 1000])
        f.fsync()
        f.close()
        expected = b"".join(a.tobytes() for a in data)
        assert path.read_bytes() == expected
        assert os.path.getsize(path) == len(expected)  # the padded tail was cut off


def test_large_file_is_written_with_o_direct_where_the_disk_takes_it(tmp_path: Path) -> None:
    f = LocalFile(str(tmp_path / "big.bin"))
    f.write([_random_bytes(CHUNK + 1, 0)])
    assert f.direct == _o_direct_works(tmp_path)
    f.close()
    small = LocalFile(str(tmp_path / "small.bin"))
    small.write([b"x" * 100])
    assert not small.direct  # a file within one chunk never uses O_DIRECT
    small.close()


def test_direct_false_writes_plainly(tmp_path: Path) -> None:
    data = _random_bytes(2 * CHUNK + 7, 1)
    f = LocalFile(str(tmp_path / "plain.bin"), direct=False)
    f.write([b"head", memoryview(data)])
    assert not f.direct
    f.fsync()
    f.close()
    assert (tmp_path / "plain.bin").read_bytes() == b"head" + data.tobytes()


def test_writes_after_fsync_are_appended(tmp_path: Path) -> None:
    first, second = _random_bytes(CHUNK + 5, 2), _random_bytes(CHUNK + 9, 3)
    f = LocalFile(str(tmp_path / "f.bin"))
    f.write([memoryview(first)])
    f.fsync()
    f.write([memoryview(second), b"end"])
    f.fsync()
    f.close()
    assert (tmp_path / "f.bin").read_bytes() == first.tobytes() + second.tobytes() + b"end"


def test_close_without_fsync_keeps_every_byte(tmp_path: Path) -> None:
    data = _random_bytes(CHUNK + 4097, 4)
    f = LocalFile(str(tmp_path / "f.bin"))
    f.write([b"abc", memoryview(data)])
    f.close()
    f.close()  # idempotent
    assert (tmp_path / "f.bin").read_bytes() == b"abc" + data.tobytes()
    with pytest.raises(ValueError, match="already closed"):
        f.write([b"more"])


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        LocalFile(str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == b"old"


def test_multi_chunk_checkpoint_restores_bit_exact_and_opens_with_safetensors(
    tmp_path: Path,
) -> None:
    # Tensors of odd sizes: every chunk boundary and the file's tail fall mid-tensor.
    state = {
        "a": np.random.default_rng(5).standard_normal(3 * CHUNK // 8 + 3),  # float64
        "b": _random_bytes(CHUNK + 11, 6),
        "c": np.arange(7, dtype=np.int16),
    }
    prefix = Saver(max_shard_bytes=2 * CHUNK).save(Session(state), str(tmp_path / "model.ckpt"))
    assert prefix is not None
    reader = open_checkpoint(prefix)
    reader.verify()
    restored = {k: np.zeros_like(v) for k, v in state.items()}
    Saver().restore(Session(restored), prefix)
    for name, value in state.items():
        assert restored[name].tobytes() == value.tobytes(), name
    files = sorted(p for p in os.listdir(prefix) if p.endswith(".safetensors"))
    loaded: dict[str, np.ndarray] = {}
    for name in files:
        loaded.update(safetensors.numpy.load_file(os.path.join(prefix, name)))
    for name, value in state.items():
        assert np.array_equal(loaded[name], value), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_background_thread_writes_through_the_cache_until_someone_waits(tmp_path: Path) -> None:
    # A thread at idle priority is a background save nobody waits for: cached writes.
    # Once it is raised again (wait()), the same file continues with O_DIRECT.
    data = _random_bytes(3 * CHUNK + 5, 7)
    f = LocalFile(str(tmp_path / "f.bin"))
    seen: list[bool] = []

    def background_part() -> None:
        lower_thread_priority()
        f.write([b"hdr", memoryview(data[: CHUNK + 1])])
        seen.append(f.direct)

    thread = threading.Thread(target=background_part)
    thread.start()
    thread.join()
    f.write([memoryview(data[CHUNK + 1 :])])  # this thread runs at normal priority
    seen.append(f.direct)
    f.fsync()
    f.close()
    assert seen == [False, _o_direct_works(tmp_path)]
    assert (tmp_path / "f.bin").read_bytes() == b"hdr" + data.tobytes()
