"""Data files: standard safetensors files, written from the state's own memory.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping
each tensor name to ``{"dtype", "shape", "data_offsets"}`` (padded with spaces so
that the data starts 8-byte aligned) and the raw bytes. ``safetensors.save_file``
first builds the whole file as one ``bytes`` object; here the header is built alone
(in pieces) and the tensors' bytes follow: a large tensor straight from its memory,
runs of small ones gathered from their arrays into one reused buffer
(``columns.TensorColumns.gather``), so a save needs the header and that buffer
beyond the state, and no Python object per tensor.

A large state is split across several files of about ``max_file_bytes`` each, which
the commit protocol writes (and readers verify) in parallel.
"""

from __future__ import annotations

import heapq
import math
import mmap
import struct
from collections.abc import Sequence
from itertools import accumulate, repeat
from json.encoder import encode_basestring_ascii
from operator import sub
from typing import Any, NamedTuple

import numpy as np

from trainhooks.checkpoint.format.bulk_json import is_plain
from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.manifest import (
    Chunk,
    FileEntry,
    TensorEntry,
    checksum,
    plan_chunks,
)
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.storage import Storage

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "FileLayout",
    "check_header",
    "data_file_name",
    "encode_header",
    "header_pieces",
    "plan_data_file",
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
# Runs of small tensors are gathered into a reused buffer of this size, written in one call.
_BATCH_BYTES = 4 * 2**20
# A tensor with a checksum run of its own is written from its memory above this size.
_GATHER_MAX = 64 * 2**10


def data_file_name(index: int, count: int) -> str:
    """``data-00000-of-00002.safetensors``, TF's shard naming."""
    return f"data-{index:05d}-of-{count:05d}.safetensors"


def plan_files(
    columns: TensorColumns, sizes: Sequence[int], max_file_bytes: int
) -> list[Sequence[int]]:
    """Split the tensors of ``columns`` (``sizes`` bytes each) into balanced groups of about
    ``max_file_bytes``, one per data file; returns each file's tensor positions in file order.

    Tensors go largest first to the least-filled file, so the files, written by one
    thread each, take about the same time. Within a file tensors are ordered by
    decreasing item size (then given order), which keeps every tensor aligned to its
    item size, as ``safetensors`` itself does. The first tensor given stays first in the
    first file.
    """
    count_tensors = len(sizes)
    if not count_tensors:
        return [[]]
    itemsizes = list(map(DTYPE_ITEMSIZE.__getitem__, columns.codes))
    total = sum(sizes)
    header = len("".join(columns.names)) + 21 * sum(map(len, columns.shapes))
    header += 64 * count_tensors
    count = max(1, math.ceil(total / max_file_bytes), math.ceil(header / _HEADER_BUDGET))
    count = min(count, count_tensors)
    if count == 1:
        groups: list[Sequence[int]] = [range(count_tensors)]
    else:
        lists: list[list[int]] = [[0]] + [[] for _ in range(count - 1)]
        heap = [(sizes[0] if i == 0 else 0, i) for i in range(count)]
        heapq.heapify(heap)
        for i in sorted(range(1, count_tensors), key=lambda i: -sizes[i]):
            load, g = heapq.heappop(heap)
            lists[g].append(i)
            heapq.heappush(heap, (load + sizes[i], g))
        for picked in lists:
            picked.sort()
        groups = list(lists)
    if len(set(itemsizes)) > 1:  # a stable sort by item size keeps the step (itemsize 8) first
        for k, group in enumerate(groups):
            keys = np.array([itemsizes[i] for i in group])
            if (keys[1:] > keys[:-1]).any():  # not already in decreasing item size
                groups[k] = [group[j] for j in np.argsort(-keys, kind="stable").tolist()]
    return [g for g in groups if g]


def _header_text(
    names: Sequence[str],
    codes: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    offsets: Sequence[int],
) -> list[bytes]:
    """The safetensors header's JSON entries, comma-joined, in pieces of a few thousand.

    ``offsets`` are the tensors' starts relative to the data, then the end of the last.
    Pieces keep the transient strings of a 100k-tensor header to a few hundred KB.
    """
    plain = is_plain("".join(names))
    # Plain names need no quoting call: their quotes come with the parts around them.
    quote = '"' if plain else ""
    middles: dict[tuple[str, tuple[int, ...]], str] = {}
    for key in set(zip(codes, shapes)):
        dims = ",".join(map(str, key[1]))
        middles[key] = f'{quote}:{{"dtype":"{key[0]}","shape":[{dims}],"data_offsets":['
    pieces = []
    step = 4096
    for lo in range(0, len(names), step):
        hi = min(lo + step, len(names))
        keys = names[lo:hi] if plain else list(map(encode_basestring_ascii, names[lo:hi]))
        mids = list(map(middles.__getitem__, zip(codes[lo:hi], shapes[lo:hi])))
        text = quote + _entries(keys, mids, offsets[lo : hi + 1], quote)
        pieces.append(text.encode("utf-8"))
    return pieces


def _entries(keys: Sequence[str], mids: list[str], offsets: Sequence[int], quote: str) -> str:
    """``keys[i] + mids[i] + f"{offsets[i]},{offsets[i + 1]}]}}"``, joined by ``"," + quote``.

    Fast path: the entries' parts are slotted into one list and joined, so each offset is
    formatted once and no Python runs per entry (two thirds of the time of an f-string per
    entry: ~15 ms for 100k tensors); :func:`_entries_reference` is the plain statement.
    """
    count = len(keys)
    if not count:
        return ""
    digits = list(map(str, offsets))
    parts = [""] * (6 * count)
    parts[0::6] = keys
    parts[1::6] = mids
    parts[2::6] = digits[:-1]
    parts[3::6] = [","] * count
    parts[4::6] = digits[1:]
    parts[5::6] = ["]}," + quote] * count
    parts[-1] = "]}"
    return "".join(parts)


def _entries_reference(
    keys: Sequence[str], mids: list[str], offsets: Sequence[int], quote: str
) -> str:
    """:func:`_entries` one entry at a time (``tests/checkpoint/test_fast_paths_datafile.py``
    compares the two)."""
    return ("," + quote).join(
        f"{k}{m}{a},{b}]}}" for k, m, a, b in zip(keys, mids, offsets, offsets[1:])
    )


def header_pieces(
    names: Sequence[str],
    codes: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    sizes: Sequence[int],
) -> tuple[list[bytes], int]:
    """The safetensors header (length prefix included) as pieces to write in order, and its
    total length. See :func:`encode_header`."""
    return _header_pieces(names, codes, shapes, list(accumulate(sizes, initial=0)))


def _header_pieces(
    names: Sequence[str],
    codes: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    offsets: Sequence[int],
) -> tuple[list[bytes], int]:
    """:func:`header_pieces` from the tensors' offsets relative to the data (one more than
    tensors: the last is the end)."""
    pieces = _header_text(names, codes, shapes, offsets)
    text_len = sum(map(len, pieces)) + max(len(pieces) - 1, 0)
    length = text_len + 2
    length += -(8 + length) % 8  # pad with spaces: tensor data starts 8-byte aligned
    if length > MAX_HEADER_BYTES:
        raise ValueError(
            f"the safetensors header of {length} bytes exceeds {MAX_HEADER_BYTES}; "
            "pass a smaller max_shard_bytes so that tensors spread over more files"
        )
    out = [struct.pack("<Q", length) + b"{"]
    for k, piece in enumerate(pieces):
        out.append(piece if k == 0 else b"," + piece)
    out.append(b"}" + b" " * (length - text_len - 2))
    return out, 8 + length


def encode_header(
    names: Sequence[str],
    codes: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    sizes: Sequence[int],
) -> bytes:
    """The safetensors header (length prefix included) for tensors given as columns.

    Tensors are laid out back to back in the given order. A reader regenerates this
    from the manifest and compares bytes, so the header needs no JSON parsing and
    cannot hide duplicate or extra entries.

    Example:
        >>> encode_header(["w"], ["F32"], [(2,)], [8])[8:]
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}  '
    """
    return b"".join(header_pieces(names, codes, shapes, sizes)[0])


class FileLayout(NamedTuple):
    """A data file as its tensors' names, dtype codes and shapes make it: all but the bytes.

    The same from one save to the next while the tensors are (``saving/layout.py`` keeps
    it): ``names``, ``dtypes``, ``shapes`` and ``sizes`` of the file's tensors in file
    order, its ``header`` pieces (:func:`header_pieces`), ``data_start``, and ``runs``, the
    tensor count of each checksum run (``manifest.plan_chunks``).
    """

    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    sizes: list[int]
    header: list[bytes]
    data_start: int
    runs: list[int]


def plan_data_file(
    columns: TensorColumns, order: Sequence[int], sizes: Sequence[int]
) -> FileLayout:
    """The layout of the data file holding tensors ``order`` of ``columns`` (``sizes`` bytes
    each, by position in ``columns``), in that order."""
    with paused_gc():  # 100k tensors make 100k strings here; none of them is garbage
        if order == range(len(columns)):  # one file in given order: no per-tensor picking
            names, dtypes = tuple(columns.names), tuple(columns.codes)
            shapes, file_sizes = tuple(columns.shapes), list(sizes)
        else:
            names = tuple(columns.names[i] for i in order)
            dtypes = tuple(columns.codes[i] for i in order)
            shapes = tuple(columns.shapes[i] for i in order)
            file_sizes = [sizes[i] for i in order]
        header, data_start = header_pieces(names, dtypes, shapes, file_sizes)
        runs = plan_chunks(file_sizes, CHUNK_BYTES)
    return FileLayout(names, dtypes, shapes, file_sizes, header, data_start, runs)


def write_data_file(
    storage: Storage,
    path: str,
    columns: TensorColumns,
    order: Sequence[int],
    sizes: Sequence[int],
    layout: FileLayout | None = None,
) -> FileEntry:
    """Write tensors ``order`` of ``columns`` as a safetensors file at ``path`` (new), fsync
    it, and describe it.

    Each run of small tensors (see ``manifest.plan_chunks``) is gathered from its sources
    (joined in C when they are plain contiguous arrays, else into a reused buffer of
    ``_BATCH_BYTES``), checksummed there and written with the runs next to it in one call; a tensor of a run of its own is checksummed and written
    straight from its memory. The memory a save needs beyond the state is that buffer
    and the header. ``sizes`` are every tensor's bytes (by position in ``columns``);
    ``layout`` is :func:`plan_data_file`'s for them, if it is known.
    Returns the file's manifest entry: its tensors as columns and their checksums.
    """
    if layout is None:
        layout = plan_data_file(columns, order, sizes)
    with paused_gc():
        return _write_data_file(storage, path, columns, order, layout)


def _write_data_file(
    storage: Storage, path: str, columns: TensorColumns, order: Sequence[int], layout: FileLayout
) -> FileEntry:
    file_sizes = layout.sizes
    position = data_start = layout.data_start
    chunks: list[Chunk] = []
    buffer: np.ndarray[Any, Any] | None = None
    pending: list[memoryview | bytes] = []
    used = 0
    first = 0
    f = storage.create(path)
    try:
        f.write(layout.header)
        for count in layout.runs:
            nbytes = sum(file_sizes[first : first + count])
            if count == 1 and nbytes > _GATHER_MAX:
                view = columns.bytes_of(order[first])
                if pending:
                    f.write(pending)
                    pending, used = [], 0
                digest = checksum(view)
                f.write([view])
                del view
            else:  # fast path: a run of small tensors is gathered, hashed and written at once
                if used + nbytes > _BATCH_BYTES:
                    f.write(pending)
                    pending, used = [], 0
                run = order[first : first + count]
                data: memoryview | bytes
                joined = columns.joined(run, nbytes)
                if joined is not None:
                    data = joined
                else:  # not all plain contiguous arrays: gathered into the reused buffer
                    if buffer is None:
                        buffer = np.empty(_BATCH_BYTES, np.uint8)
                    block = buffer[used : used + nbytes]
                    columns.gather(run, file_sizes[first : first + count], block)
                    data = block.data
                digest = checksum(data)
                pending.append(data)
                used += nbytes
            chunks.append(Chunk(first, count, position, position + nbytes, digest))
            first += count
            position += nbytes
        if pending:
            f.write(pending)
        f.fsync()
    finally:
        f.close()
    return FileEntry(
        position, data_start, layout.names, layout.dtypes, layout.shapes, tuple(chunks)
    )


def _write_data_file_reference(
    storage: Storage, path: str, columns: TensorColumns, order: Sequence[int], sizes: Sequence[int]
) -> FileEntry:
    """:func:`_write_data_file` one tensor at a time: each written from its own bytes, each
    checksum run hashed from its tensors' bytes joined. The plain statement of the file
    format (a property test, ``tests/checkpoint/test_fast_paths_datafile.py``, compares
    the two byte for byte); a call and a hash per tensor make it slow for 100k tensors."""
    names = tuple(columns.names[i] for i in order)
    dtypes = tuple(columns.codes[i] for i in order)
    shapes = tuple(columns.shapes[i] for i in order)
    file_sizes = [sizes[i] for i in order]
    header, position = header_pieces(names, dtypes, shapes, file_sizes)
    data_start = position
    chunks: list[Chunk] = []
    first = 0
    f = storage.create(path)
    try:
        f.write(header)
        for count in plan_chunks(file_sizes, CHUNK_BYTES):
            run = [columns.bytes_of(order[i]) for i in range(first, first + count)]
            for view in run:
                f.write([view])
            nbytes = sum(file_sizes[first : first + count])
            digest = checksum(b"".join(run))
            chunks.append(Chunk(first, count, position, position + nbytes, digest))
            first += count
            position += nbytes
        f.fsync()
    finally:
        f.close()
    return FileEntry(position, data_start, names, dtypes, shapes, tuple(chunks))


def read_header(
    data: mmap.mmap | memoryview | bytes, file_size: int, fail: Any, expected_end: int | None = None
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
    return bytes(data[: 8 + length])


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
    data: mmap.mmap | memoryview | bytes, file_size: int, file: FileEntry, fail: Any
) -> None:
    """Check a data file's header against its decoded manifest entry (columns and offsets),
    never copying a header longer than the one the entry makes (a forged length is
    refused unread). The header must be byte for byte the one this module writes.
    """
    # relative to the data: the offsets' differences are the sizes, with no list of them
    relative = list(map(sub, file.offsets, repeat(file.data_start)))
    try:
        pieces = _header_pieces(file.names, file.dtypes, file.shapes, relative)[0]
        canonical = b"".join(pieces)
    except ValueError as e:
        raise fail(str(e)) from None
    if len(canonical) != file.data_start:
        raise fail(
            f"the manifest's data_start {file.data_start} does not match the "
            f"{len(canonical)}-byte header of its tensors"
        )
    header = read_header(data, file_size, fail, expected_end=len(canonical))
    _compare(header, canonical, fail)


def _canonical(expected: Sequence[tuple[str, TensorEntry]], fail: Any) -> bytes:
    try:
        return encode_header(
            [n for n, _ in expected],
            [e.dtype for _, e in expected],
            [e.shape for _, e in expected],
            [e.end - e.start for _, e in expected],
        )
    except ValueError as e:
        raise fail(str(e)) from None


def _compare(header: bytes, canonical: bytes, fail: Any) -> None:
    if header != canonical:
        at = next(i for i, (a, b) in enumerate(zip(header, canonical + b"\0")) if a != b)
        raise fail(
            f"header differs from the manifest at byte {at} "
            f"(...{header[max(0, at - 40) : at + 40]!r}...); the header is corrupt"
        )
