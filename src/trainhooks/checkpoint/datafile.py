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
import math
import mmap
import struct
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii
from typing import Any

import xxhash

from trainhooks.checkpoint.manifest import (
    Chunk,
    FileEntry,
    TensorEntry,
    checksum,
    paused_gc,
    plan_chunks,
)
from trainhooks.checkpoint.storage import Storage
from trainhooks.checkpoint.tensor import DTYPE_ITEMSIZE, TensorData

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "check_header",
    "data_file_name",
    "encode_header",
    "plan_files",
    "read_header",
    "verify_header",
    "write_data_file",
]

#: Default target size of one data file.
DEFAULT_MAX_FILE_BYTES = 256 * 2**20
#: The safetensors library refuses headers above 100 MB; stay well below it.
MAX_HEADER_BYTES = 100_000_000
_HEADER_BUDGET = 64 * 2**20
#: Small tensors share a checksum per run of about this many bytes (``manifest.py``).
CHUNK_BYTES = 2**20
# Writes are grouped into one os.writev of up to this many bytes / buffers.
_BATCH_BYTES = 64 * 2**20
_BATCH_BUFFERS = 1024


def data_file_name(index: int, count: int) -> str:
    """``data-00000-of-00002.safetensors``, TF's shard naming."""
    return f"data-{index:05d}-of-{count:05d}.safetensors"


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
    header = sum(len(n) + 21 * len(t.shape) for n, t in items) + 64 * len(items)
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
    if count == 1:  # already in insertion order: a stable sort by item size keeps it
        groups[0].sort(key=lambda item: -DTYPE_ITEMSIZE[item[1].dtype])
    else:
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
    quote = encode_basestring_ascii  # json.dumps(name) without its per-call overhead
    shapes: dict[tuple[int, ...], str] = {}
    parts = []
    offset = 0
    for name, dtype, shape, nbytes in specs:
        dims = shapes.get(shape)
        if dims is None:
            dims = shapes[shape] = ",".join(map(str, shape))
        end = offset + nbytes
        parts.append(
            f'{quote(name)}:{{"dtype":"{dtype}","shape":[{dims}],"data_offsets":[{offset},{end}]}}'
        )
        offset = end
    text = ",".join(parts).encode("utf-8")
    del parts  # a state of 100k tensors: keep one copy of its header at a time
    length = len(text) + 2
    length += -(8 + length) % 8  # pad with spaces: tensor data starts 8-byte aligned
    if length > MAX_HEADER_BYTES:
        raise ValueError(
            f"the safetensors header of {length} bytes exceeds {MAX_HEADER_BYTES}; "
            "pass a smaller max_shard_bytes so that tensors spread over more files"
        )
    padding = b" " * (length - len(text) - 2)
    return b"".join((struct.pack("<Q", length), b"{", text, b"}", padding))


def write_data_file(
    storage: Storage, path: str, group: Sequence[tuple[str, TensorData]]
) -> FileEntry:
    """Write ``group`` as a safetensors file at ``path`` (new), fsync it, and describe it.

    Tensor bytes go to ``os.writev`` straight from their buffers, up to 1024 buffers
    per call; each run of tensors (see ``manifest.plan_chunks``) is checksummed on the
    way. Returns the file's manifest entry: its tensors as columns and their checksums.
    """
    with paused_gc():  # 100k tensors make 100k tuples here; none of them is garbage
        return _write_data_file(storage, path, group)


def _write_data_file(
    storage: Storage, path: str, group: Sequence[tuple[str, TensorData]]
) -> FileEntry:
    names = tuple(n for n, _ in group)
    dtypes = tuple(t.dtype for _, t in group)
    shapes = tuple(t.shape for _, t in group)
    buffers = [t.buffer for _, t in group]
    sizes = [b.nbytes for b in buffers]
    header = encode_header(list(zip(names, dtypes, shapes, sizes)))
    chunks: list[Chunk] = []
    first = 0
    position = len(header)
    for count in plan_chunks(sizes, CHUNK_BYTES):
        run = buffers[first : first + count]
        if count == 1:
            digest = checksum(run[0])
        else:
            hasher = xxhash.xxh3_128()
            for b in run:
                hasher.update(b)
            digest = hasher.hexdigest()
        end = position + sum(sizes[first : first + count])
        chunks.append(Chunk(first, count, position, end, digest))
        first += count
        position = end
    f = storage.create(path)
    try:
        f.write([header])
        batch_start = batch_bytes = 0
        for i, n in enumerate(sizes):
            batch_bytes += n
            if batch_bytes >= _BATCH_BYTES or i + 1 - batch_start >= _BATCH_BUFFERS:
                f.write(buffers[batch_start : i + 1])
                batch_start, batch_bytes = i + 1, 0
        f.write(buffers[batch_start:])
        f.fsync()
    finally:
        f.close()
    return FileEntry(position, len(header), names, dtypes, shapes, tuple(chunks))


def read_header(
    data: mmap.mmap | bytes, file_size: int, fail: Any, expected_end: int | None = None
) -> bytes:
    """A data file's header (length prefix included), its length bounded by the file size.

    ``data`` is the mapped file; ``fail(message)`` builds the error to raise. With
    ``expected_end`` (the manifest's ``data_start``), a header claiming another length
    is refused before a byte of it is copied.
    """
    if file_size < 8:
        raise fail(f"only {file_size} bytes long, too short for a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(file_size - 8, MAX_HEADER_BYTES):
        raise fail(f"header length {length} exceeds the file ({file_size} bytes)")
    if expected_end is not None and 8 + length != expected_end:
        raise fail(f"header ends at byte {8 + length}, the manifest says {expected_end}")
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
    _compare(header, _canonical(expected, fail), fail)


def verify_header(
    data: mmap.mmap | bytes,
    file_size: int,
    file: FileEntry,
    expected: Sequence[tuple[str, TensorEntry]],
    fail: Any,
) -> None:
    """:func:`read_header` and :func:`check_header` in one, never copying a header longer
    than the one the manifest's entries make (a forged length is refused unread)."""
    canonical = _canonical(expected, fail)
    if len(canonical) != file.data_start:
        raise fail(
            f"the manifest's data_start {file.data_start} does not match the "
            f"{len(canonical)}-byte header of its tensors"
        )
    header = read_header(data, file_size, fail, expected_end=len(canonical))
    position = file.data_start
    for name, entry in expected:
        if entry.start != position:
            raise fail(f"tensor {name!r} starts at byte {entry.start}, expected {position}")
        position = entry.end
    if position != file.size:
        raise fail(f"tensors end at byte {position}, the file at {file.size}")
    _compare(header, canonical, fail)


def _canonical(expected: Sequence[tuple[str, TensorEntry]], fail: Any) -> bytes:
    try:
        return encode_header([(n, e.dtype, e.shape, e.end - e.start) for n, e in expected])
    except ValueError as e:
        raise fail(str(e)) from None


def _compare(header: bytes, canonical: bytes, fail: Any) -> None:
    if header != canonical:
        at = next(i for i, (a, b) in enumerate(zip(header, canonical + b"\0")) if a != b)
        raise fail(
            f"header differs from the manifest at byte {at} "
            f"(...{header[max(0, at - 40) : at + 40]!r}...); the header is corrupt"
        )
