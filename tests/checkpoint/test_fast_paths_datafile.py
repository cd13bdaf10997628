"""``datafile.write_data_file`` (runs of small tensors gathered into one buffer, hashed
and written in one call) against its plain reference, which writes and hashes the
tensors one at a time: the same file, byte for byte, and the same manifest entry.
"""

from __future__ import annotations

import itertools
import json
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainhooks.checkpoint.format import datafile
from trainhooks.checkpoint.format.columns import GATHER_DTYPES, TensorColumns
from trainhooks.checkpoint.format.manifest import FileEntry
from trainhooks.checkpoint.format.tensor import TensorData

DTYPES = sorted(GATHER_DTYPES, key=str)


class RecordingStorage:
    """Storage that keeps what each file was sent, in order, and checks it was closed."""

    def __init__(self) -> None:
        self.files: dict[str, list[bytes]] = {}
        self.closed: list[str] = []

    def create(self, path: str) -> Any:
        storage, written = self, self.files.setdefault(path, [])

        class File:
            def write(self, buffers: Sequence[memoryview | bytes]) -> None:
                written.extend(bytes(b) for b in buffers)

            def fsync(self) -> None:
                pass

            def close(self) -> None:
                storage.closed.append(path)

        return File()


def write(fn: Any, columns: TensorColumns, order: Sequence[int]) -> tuple[bytes, FileEntry]:
    storage = RecordingStorage()
    entry = fn(storage, "f", columns, order, columns.nbytes())
    assert storage.closed == ["f"]
    return b"".join(storage.files["f"]), entry


@contextmanager
def small_runs() -> Iterator[None]:
    """The run, gather and batch sizes scaled down alike (1 MiB, 64 KiB, 4 MiB by
    default), so that a few small tensors take every branch: runs, tensors written
    on their own, a full batch buffer written before the next run."""
    with (
        mock.patch.object(datafile, "CHUNK_BYTES", 64),
        mock.patch.object(datafile, "_GATHER_MAX", 16),
        mock.patch.object(datafile, "_BATCH_BYTES", 256),
    ):
        yield


@st.composite
def sources(draw: st.DrawFn) -> tuple[str, tuple[int, ...], Any]:
    """A tensor as a column holds it: a NumPy array of any layout, or ``TensorData``."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    values = np.arange(int(np.prod(shape)) * 2) * draw(st.integers(1, 99))
    array = values.astype(dtype)[::2].reshape(shape)  # a strided view
    layout = draw(st.sampled_from(["view", "contiguous", "fortran", "tensor data"]))
    if layout == "contiguous":
        array = np.ascontiguousarray(array)
    elif layout == "fortran":
        array = np.asfortranarray(array)
    code = GATHER_DTYPES[np.dtype(dtype)]
    if layout == "tensor data":
        return code, shape, TensorData(code, shape, memoryview(array.tobytes()))
    return code, shape, array


@st.composite
def columns_and_order(draw: st.DrawFn) -> tuple[TensorColumns, Sequence[int]]:
    tensors = draw(st.lists(sources(), max_size=12))
    columns = TensorColumns(
        [f"t{i}" for i in range(len(tensors))],
        [code for code, _, _ in tensors],
        [shape for _, shape, _ in tensors],
        [source for _, _, source in tensors],
    )
    whole = range(len(tensors))  # one file, in given order (a path of its own)
    picked = draw(st.permutations(list(whole)))[: draw(st.integers(0, len(tensors)))]
    return columns, draw(st.sampled_from([whole, picked, sorted(picked)]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(columns_and_order())
def test_gathered_writes_agree_with_the_reference(case: Any) -> None:
    columns, order = case
    with small_runs():
        fast = write(datafile.write_data_file, columns, order)
        assert fast == write(datafile._write_data_file_reference, columns, order)


def test_default_sizes_agree_with_the_reference() -> None:
    """Unscaled: tensors around 64 KiB and 1 MiB, and runs that fill the 4 MiB buffer."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 255, n, dtype=np.uint8) for n in (8, 2**16, 2**16 + 1, 2**20 + 3)]
    arrays += [rng.standard_normal(50_000).astype(np.float32)[::2] for _ in range(120)]
    columns = TensorColumns(
        [f"t{i}" for i in range(len(arrays))],
        [GATHER_DTYPES[a.dtype] for a in arrays],
        [a.shape for a in arrays],
        list(arrays),
    )
    for order in (range(len(arrays)), list(range(len(arrays)))[::-1]):
        fast = write(datafile.write_data_file, columns, order)
        assert fast == write(datafile._write_data_file_reference, columns, order)


# Names a header must quote: plain ASCII, quotes and backslashes, control and non-ASCII.
header_names = st.lists(
    st.text(st.sampled_from(['a', '/', '.', '"', "\\", "\n", "\u00e9", "\u4e2d", "\U0001f600"]),
            min_size=1, max_size=4),
    unique=True, max_size=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(header_names, st.data())
def test_header_agrees_with_json_dumps(names: list[str], data: st.DataObject) -> None:
    """The header (entries slotted into one list and joined) against ``json.dumps`` of the
    same entries: plain names, names that need escaping, 0-d and empty tensors."""
    count = len(names)
    codes = data.draw(st.lists(st.sampled_from(["F32", "BF16", "I64", "U8", "BOOL"]),
                               min_size=count, max_size=count))  # fmt: skip
    shapes = data.draw(st.lists(st.lists(st.integers(0, 2**40), max_size=3).map(tuple),
                                min_size=count, max_size=count))  # fmt: skip
    sizes = data.draw(st.lists(st.integers(0, 2**45), min_size=count, max_size=count))
    offsets = [0, *itertools.accumulate(sizes)]
    entries = {
        n: {"dtype": c, "shape": list(s), "data_offsets": [a, b]}
        for n, c, s, a, b in zip(names, codes, shapes, offsets, offsets[1:])
    }
    text = json.dumps(entries, separators=(",", ":")).encode()
    header = datafile.encode_header(names, codes, shapes, sizes)
    (length,) = struct.unpack("<Q", header[:8])
    assert length == len(header) - 8 and len(header) % 8 == 0
    assert header[8:].rstrip(b" ") == text


@given(st.lists(st.text(max_size=3), max_size=9), st.sampled_from(["", '"']), st.data())
def test_slotted_entries_agree_with_the_reference(
    keys: list[str], quote: str, data: st.DataObject
) -> None:
    mids = data.draw(st.lists(st.text(max_size=3), min_size=len(keys), max_size=len(keys)))
    offsets = data.draw(st.lists(st.integers(0, 2**50), min_size=len(keys) + 1,
                                 max_size=len(keys) + 1))  # fmt: skip
    fast = datafile._entries(keys, mids, offsets, quote)
    assert fast == datafile._entries_reference(keys, mids, offsets, quote)
