"""Data files: small tensors gathered into checksum runs of ~1 MiB, large ones on their own.

``datafile.write_data_file`` checksums each run of small tensors once, from the buffer
it gathers them into, and a tensor of 1 MiB or more on its own, straight from its
memory. A flipped byte must then be reported naming the data file and exactly the
tensors of the run it hit, and must not spoil the tensors of any other run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.checkpoints import flip_byte_of

from trainhooks import errors
from trainhooks.checkpoint.format.datafile import CHUNK_BYTES
from trainhooks.checkpoint.format.manifest import Chunk, FileEntry
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session

MIB = 2**20
KIB_200 = 200 * 1024  # five of them fit in one run, a sixth does not


def make_state() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        "mid": {
            f"{i:02d}": rng.standard_normal(KIB_200 // 4).astype(np.float32) for i in range(12)
        },
        "tiny": {f"{i:04d}": rng.standard_normal(16).astype(np.float32) for i in range(300)},
        "exact": rng.standard_normal(MIB // 4).astype(np.float32),  # exactly 1 MiB
        "huge": rng.standard_normal(3 * MIB // 8).astype(np.float64),
    }


@pytest.fixture
def saved(tmp_path: Path) -> str:
    prefix = Saver().save(Session(make_state(), global_step=7), str(tmp_path / "m"), 7)
    assert prefix is not None
    return prefix


def run_of(prefix: str, tensor: str) -> tuple[str, FileEntry, Chunk, list[str]]:
    """The data file, its entry, the checksum run holding ``tensor`` and the run's tensors."""
    with open_checkpoint(prefix) as ckpt:
        entry = ckpt.entry(tensor)
        file = ckpt.manifest.files[entry.file]
    chunk = file.chunks[entry.chunk]
    return entry.file, file, chunk, list(file.names[chunk.first : chunk.first + chunk.tensor_count])


def test_small_tensors_share_runs_of_about_a_mebibyte(saved: str) -> None:
    with open_checkpoint(saved) as ckpt:
        (file,) = ckpt.manifest.files.values()
        runs = [list(file.names[c.first : c.first + c.tensor_count]) for c in file.chunks]
        for chunk in file.chunks:
            assert chunk.tensor_count == 1 or chunk.end - chunk.start <= CHUNK_BYTES
    assert [f"mid/{i:02d}" for i in range(5, 10)] in runs
    tiny_runs = [r for r in runs if any(n.startswith("tiny/") for n in r)]
    assert len(tiny_runs) == 1 and len(tiny_runs[0]) > 300  # 300 x 64 bytes: one run
    assert len(runs) < 10  # a few checksums for 315 tensors


@pytest.mark.parametrize("tensor", ["mid/07", "tiny/0000", "tiny/0150", "tiny/0299"])
@pytest.mark.parametrize("where", [0.0, 0.5, 1.0], ids=["first-byte", "middle", "last-byte"])
def test_a_flipped_byte_in_a_run_names_the_file_and_the_runs_tensors(
    saved: str, tensor: str, where: float
) -> None:
    file_name, _, chunk, names = run_of(saved, tensor)
    assert tensor in names and len(names) > 1
    flip_byte_of(saved, tensor, where, mask=0x10)

    with open_checkpoint(saved) as ckpt, pytest.raises(errors.DataLossError) as info:
        ckpt.verify()
    message = str(info.value)
    assert saved in message and f"file {file_name}" in message
    assert f"one of the {len(names)} tensors checksummed together" in message
    assert all(repr(n) in message for n in names[:5])
    assert ("..." in message) == (len(names) > 5)
    assert f"bytes [{chunk.start}, {chunk.end})" in message
    assert "'exact'" not in message and "'huge'" not in message

    with open_checkpoint(saved) as ckpt:  # the other runs still read, the hit one does not
        assert bytes(ckpt.tensor_data("exact").buffer) == make_state()["exact"].tobytes()
        assert bytes(ckpt.tensor_data("mid/00").buffer) == make_state()["mid"]["00"].tobytes()
        with pytest.raises(errors.DataLossError, match="checksummed together"):
            ckpt.tensor_data(tensor)


def test_the_run_of_five_mid_sized_tensors_is_named_in_full(saved: str) -> None:
    flip_byte_of(saved, "mid/07", 0.5, mask=0x10)
    with pytest.raises(errors.DataLossError) as info:
        Saver().restore(Session(make_state()), saved)
    message = str(info.value)
    assert "one of the 5 tensors checksummed together" in message
    assert "'mid/05', 'mid/06', 'mid/07', 'mid/08', 'mid/09': checksum mismatch" in message
    assert "'mid/04'" not in message and "'mid/10'" not in message


@pytest.mark.parametrize("tensor", ["exact", "huge"])
def test_a_tensor_of_a_mebibyte_or_more_has_its_own_checksum(saved: str, tensor: str) -> None:
    _, _, chunk, names = run_of(saved, tensor)
    assert names == [tensor] and chunk.tensor_count == 1
    flip_byte_of(saved, tensor, 0.5, mask=0x10)

    with open_checkpoint(saved) as ckpt:
        with pytest.raises(errors.DataLossError) as info:
            ckpt.verify()
        assert f"tensor {tensor!r}: checksum mismatch" in str(info.value)
        assert "checksummed together" not in str(info.value)
        tiny = make_state()["tiny"]["0150"]
        assert bytes(ckpt.tensor_data("tiny/0150").buffer) == tiny.tobytes()
