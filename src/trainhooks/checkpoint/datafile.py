"""Data files: standard safetensors files, written by streaming each tensor's bytes.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping
each tensor name to ``{"dtype", "shape", "data_offsets"}`` (padded with spaces so
that the data starts 8-byte aligned) and the raw bytes. ``safetensors.save_file``
first builds the whole file as one ``bytes`` object; here the header is built alone
and every tensor's memoryview goes straight to ``os.writev``, so a save needs no
memory beyond the header.

A large state is split across several files of about ``max_file_bytes`` each, which
the commit protocol writes (and readers verify) in parallel.
"""

from __future__ import annotations

import heapq
import json
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from trainhooks.checkpoint.manifest import FileEntry, TensorEntry, checksum
from trainhooks.checkpoint.storage import Storage
from trainhooks.checkpoint.tensor import DTYPE_ITEMSIZE, TensorData

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "check_header",
    "data_file_name",
    "encode_header",
    "plan_files",
    "read_header",
    "write_data_file",
]

#: Default target size of one data file.
DEFAULT_MAX_FILE_BYTES = 256 * 2**20
#: The safetensors library refuses headers above 100 MB; stay well below it.
MAX_HEADER_BYTES = 100_000_000
_HEADER_BUDGET = 64 * 2**20
# Writes are grouped into one os.writev of up to this many bytes / buffers.
_BATCH_BYTES = 64 * 2**20
_BATCH_BUFFERS = 1024


def data_file_name(index: int, count: int) -> str:
    """``data-00000-of-00002.safetensors``, TF's shard naming."""
    return f"data-{index:05d}-of-{count:05d}.safetensors"


def _header_estimate(name: str, t: TensorData) -> int:
    return len(name) + 64 + 21 * len(t.shape)


def plan_files(
    tensors: Mapping[str, TensorData], max_file_bytes: int
) -> list[list[tuple[str, TensorData]]]:
    """Split ``tensors`` into balanced groups of about ``max_file_bytes``, one per data file.

    Tensors go largest first to the least-filled file, so the files, written by one
    thread each, take about the same time. Within a file tensors are ordered by
    decreasing item size (then insertion order), which keeps every tensor aligned to
    its item size, as ``safetensors`` itself does. The first tensor given stays first
    in the first file.
    """
    items = list(tensors.items())
    if not items:
        return [[]]
    total = sum(t.buffer.nbytes for _, t in items)
    header = sum(_header_estimate(n, t) for n, t in items)
    count = max(1, math.ceil(total / max_file_bytes), math.ceil(header / _HEADER_BUDGET))
    count = min(count, len(items))
    groups: list[list[tuple[str, TensorData]]] = [[] for _ in range(count)]
    groups[0].append(items[0])
    if count == 1:
        groups[0].extend(items[1:])
    else:
        heap = [(items[0][1].buffer.nbytes if i == 0 else 0, i) for i in range(count)]
        heapq.heapify(heap)
        for name, t in sorted(items[1:], key=lambda item: -item[1].buffer.nbytes):
            load, i = heapq.heappop(heap)
            groups[i].append((name, t))
            heapq.heappush(heap, (load + t.buffer.nbytes, i))
    order = {name: i for i, (name, _) in enumerate(items)}
    for group in groups:  # stable: the first tensor (itemsize 8: the step) stays first
        group.sort(key=lambda item: (-DTYPE_ITEMSIZE[item[1].dtype], order[item[0]]))
    return [g for g in groups if g]


def encode_header(specs: Sequence[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The safetensors header (length prefix included) for ``(name, dtype, shape, nbytes)``.

    Tensors are laid out back to back in the given order. A reader regenerates this
    from the manifest and compares bytes, so the header needs no JSON parsing and
    cannot hide duplicate or extra entries.
    """
    dumps = json.dumps
    parts = []
    offset = 0
    for name, dtype, shape, nbytes in specs:
        parts.append(
            f'{dumps(name)}:{{"dtype":"{dtype}","shape":[{",".join(map(str, shape))}],'
            f'"data_offsets":[{offset},{offset + nbytes}]}}'
        )
        offset += nbytes
    body = ("{" + ",".join(parts) + "}").encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    if len(body) > MAX_HEADER_BYTES:
        raise ValueError(
            f"the safetensors header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}; "
            "pass a smaller max_shard_bytes so that tensors spread over more files"
        )
    return struct.pack("<Q", len(body)) + body


def write_data_file(
    storage: Storage, path: str, group: Sequence[tuple[str, TensorData]]
) -> tuple[FileEntry, dict[str, TensorEntry]]:
    """Write ``group`` as a safetensors file at ``path`` (new), fsync it, and describe it.

    Each tensor is checksummed and handed to ``os.writev`` straight from its buffer.
    Returns the file's manifest entry and one manifest entry per tensor.
    """
    file_name = os.path.basename(path)
    header = encode_header([(n, t.dtype, t.shape, t.buffer.nbytes) for n, t in group])
    start = len(header)
    entries: dict[str, TensorEntry] = {}
    f = storage.create(path)
    try:
        f.write([header])
        batch: list[memoryview] = []
        batch_bytes = 0
        for name, t in group:
            end = start + t.buffer.nbytes
            entries[name] = TensorEntry(file_name, t.dtype, t.shape, start, end, checksum(t.buffer))
            start = end
            batch.append(t.buffer)
            batch_bytes += t.buffer.nbytes
            if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_BUFFERS:
                f.write(batch)
                batch, batch_bytes = [], 0
        f.write(batch)
        f.fsync()
    finally:
        f.close()
    return FileEntry(start, len(header)), entries


def read_header(data: mmap.mmap, file_size: int, fail: Any) -> bytes:
    """A data file's header (length prefix included), its length bounded by the file size.

    ``data`` is the mapped file; ``fail(message)`` builds the error to raise.
    """
    if file_size < 8:
        raise fail(f"only {file_size} bytes long, too short for a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(file_size - 8, MAX_HEADER_BYTES):
        raise fail(f"header length {length} exceeds the file ({file_size} bytes)")
    return data[: 8 + length]


def check_header(
    header: bytes, file: FileEntry, expected: Sequence[tuple[str, TensorEntry]], fail: Any
) -> None:
    """Check a data file's header against the manifest's entries for that file (in file order).

    The header must be byte for byte the one :func:`encode_header` writes for those
    entries, and the entries must lie back to back from ``data_start``.
    """
    if len(header) != file.data_start:
        raise fail(f"header ends at byte {len(header)}, the manifest says {file.data_start}")
    position = file.data_start
    for name, entry in expected:
        if entry.start != position:
            raise fail(f"tensor {name!r} starts at byte {entry.start}, expected {position}")
        position = entry.end
    if position != file.size:
        raise fail(f"tensors end at byte {position}, the file at {file.size}")
    try:
        canonical = encode_header([(n, e.dtype, e.shape, e.end - e.start) for n, e in expected])
    except ValueError as e:
        raise fail(str(e)) from None
    if header != canonical:
        at = next(i for i, (a, b) in enumerate(zip(header, canonical + b"\0")) if a != b)
        raise fail(
            f"header differs from the manifest at byte {at} "
            f"(...{header[max(0, at - 40) : at + 40]!r}...); the header is corrupt"
        )
