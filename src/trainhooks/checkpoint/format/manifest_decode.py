"""Reading ``manifest.json``: its checksum, then every field, before anything is trusted.

:func:`decode_manifest` treats the file as hostile (a checkpoint may come from anywhere):
the seal (``manifest_checksum``) must match, duplicate JSON keys are refused, every
field is type-checked and bounded before anything is allocated from it, file names must
be plain basenames, and the tensors of each file must end exactly at its size. Any
problem raises :class:`~trainhooks.errors.DataLossError` naming the checkpoint. The
schema and the writing side are in ``manifest.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from itertools import accumulate, chain
from operator import mul
from typing import Any, TypeGuard

from trainhooks.checkpoint.format import bulk_loads
from trainhooks.checkpoint.format.boxes import decode_sharded
from trainhooks.checkpoint.format.manifest import (
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    FORMAT_VERSION,
    GLOBAL_STEP_NAME,
    MANIFEST_NAME,
    SEAL_KEY,
    SEAL_LENGTH,
    SHARDED_FORMAT_VERSION,
    Chunk,
    FileEntry,
    Manifest,
    TensorIndex,
    checksum,
)
from trainhooks.checkpoint.format.names import first_duplicate
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.errors import DataLossError

__all__ = ["decode_manifest", "is_plain_basename", "strict_json_loads"]

# More dimensions than any framework supports (NumPy allows 64).
_MAX_NDIM = 64
_MAX_DIM = 2**63 - 1


def _unseal(raw: bytes) -> bytes | None:
    """The manifest without its checksum key if the checksum matches, else None."""
    tail = raw[-SEAL_LENGTH:]
    if len(raw) < SEAL_LENGTH + 2 or not tail.startswith(SEAL_KEY) or not tail.endswith(b'"}'):
        return None
    text = raw[:-SEAL_LENGTH] + b"}"
    return text if checksum(text).encode("ascii") == tail[len(SEAL_KEY) : -2] else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError(f"duplicate key {first_duplicate(k for k, _ in pairs)!r}")
    return result


def strict_json_loads(raw: bytes | memoryview) -> Any:
    """``json.loads`` that refuses duplicate keys (a later entry must not shadow an earlier).

    JSON nested too deeply for the parser raises ValueError rather than RecursionError.
    """
    try:
        return json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _loads(raw: bytes) -> Any:
    """:func:`strict_json_loads`, its long arrays decoded in bulk where ``bulk_loads`` can."""
    text = raw.decode("utf-8")
    doc = bulk_loads.loads(text, _no_duplicates)
    return strict_json_loads(raw) if doc is None else doc


def is_plain_basename(name: object) -> bool:
    """True for a file name that stays inside its directory: no separators, '.', '..', NUL."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\x00")
        and not (len(name) >= 2 and name[1] == ":")  # a Windows drive
    )


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and validate ``manifest.json``; ``where`` names the checkpoint in errors.

    Checks the schema, that file names are plain basenames, that each file's tensors
    (back to back from ``data_start``, sized by dtype and shape) end exactly at the
    file's size, that the checksum runs cover every tensor once, that no tensor name
    repeats, and that the global step is stored as a 0-d I64 tensor.

    Raises:
      DataLossError: anything is missing, malformed or out of bounds.
    """

    def fail(message: str) -> DataLossError:
        return DataLossError(f"Checkpoint {where}: {MANIFEST_NAME}: {message}")

    with paused_gc():
        return _decode(raw, fail)


def _decode(raw: bytes, fail: Callable[[str], DataLossError]) -> Manifest:
    text = _unseal(raw)
    if text is None:
        raise fail("checksum mismatch or missing; the file is corrupt or truncated")
    try:
        doc = _loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"not valid JSON ({e}); the file is corrupt or truncated") from None
    if not isinstance(doc, dict):
        raise fail("the top level is not a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise fail(f"'format' is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    version = doc.get("version")
    if not _is_int(version) or version < 1:
        raise fail(f"'version' is {version!r}, expected a positive integer")
    if version > FORMAT_VERSION:
        raise fail(
            f"format version {version} is newer than this trainhooks reads "
            f"({FORMAT_VERSION}); upgrade trainhooks"
        )
    if doc.get("checksum_algorithm") != CHECKSUM_ALGORITHM:
        raise fail(
            f"checksum algorithm {doc.get('checksum_algorithm')!r} is not supported "
            f"(expected {CHECKSUM_ALGORITHM!r})"
        )
    global_step, wall_time, metadata = (
        doc.get("global_step"),
        doc.get("wall_time"),
        doc.get("metadata"),
    )
    if not _is_int(global_step):
        raise fail(f"'global_step' is {global_step!r}, expected an integer")
    if not isinstance(wall_time, (int, float)) or isinstance(wall_time, bool):
        raise fail(f"'wall_time' is {wall_time!r}, expected a number")
    if not isinstance(metadata, dict):
        raise fail("'metadata' is not a JSON object")
    if "tree" not in doc:
        raise fail("'tree' is missing")
    files_doc = doc.get("files")
    if not isinstance(files_doc, dict) or not files_doc:
        raise fail("'files' is not a non-empty JSON object")
    files: dict[str, FileEntry] = {}
    index: dict[str, int] = {}
    for name, entry in files_doc.items():  # a file's names are indexed before the next is read
        files[name] = _decode_file(name, entry, fail)
        _index_file(index, files, name, fail)
    tensors = TensorIndex(files, index)
    sharded = {}
    if "sharded" in doc:
        if version < SHARDED_FORMAT_VERSION:
            raise fail(f"'sharded' needs format version {SHARDED_FORMAT_VERSION}, not {version}")
        sharded = decode_sharded(doc["sharded"], tensors, fail)
    step_entry = tensors.get(GLOBAL_STEP_NAME)
    if step_entry is None or step_entry.dtype != "I64" or step_entry.shape != ():
        raise fail(f"the global step is not stored as a 0-d I64 tensor {GLOBAL_STEP_NAME!r}")
    return Manifest(global_step, float(wall_time), doc["tree"], metadata, files, tensors, sharded)


def _index_file(
    index: dict[str, int], files: dict[str, FileEntry], name: str, fail: Callable[[str], Exception]
) -> None:
    """Add the names of ``files[name]`` (the last file decoded) to ``index``, each at its
    position among all; raise if a name repeats.

    One pass over the names builds the index and finds a repeat: the index is then short.
    """
    names = files[name].names
    known = len(index)
    index.update(zip(names, range(known, known + len(names))))
    if len(index) != known + len(names):
        seen = chain.from_iterable(f.names for f in files.values())
        raise fail(f"duplicate tensor name {first_duplicate(seen)!r}")


def _decode_file(fname: str, entry: object, fail: Callable[[str], Exception]) -> FileEntry:
    """Validate one file's columns; a few passes in C over them, Python per distinct shape.

    Any check that fails hands over to :func:`_decode_file_reference`, whose plain loops
    raise the error naming the first bad entry. A repeated name is left to :func:`_index_file`.
    """
    size, data_start, names, dtypes, shapes, chunks = _file_columns(fname, entry, fail)
    # fast path: C passes over 100k tensors and a check per distinct shape, not a loop each
    if (
        set(map(type, names)) - {str}  # a repeated name is found as the index is built
        or (shapes and set(map(type, shapes)) != {list})
        # each dimension's type: (1.0,) and (True,) equal (1,) and would pass as it
        or set(map(type, chain.from_iterable(shapes))) - {int}
    ):
        return _decode_file_reference(fname, entry, fail)
    # One tuple per distinct shape: 100k live tuples would cost memory and a GC pass.
    distinct: dict[tuple[int, ...], tuple[int, ...]] = {}
    tuples = list(map(tuple, shapes))
    tuples = list(map(distinct.setdefault, tuples, tuples))
    numel: dict[tuple[int, ...], int] = {}
    for shape in distinct:
        # Python integers: a hostile shape cannot overflow to a small size
        if len(shape) > _MAX_NDIM or not all(0 <= d <= _MAX_DIM for d in shape):
            return _decode_file_reference(fname, entry, fail)
        numel[shape] = math.prod(shape)
    try:  # a KeyError or TypeError here is an unknown dtype
        itemsizes = list(map(DTYPE_ITEMSIZE.__getitem__, dtypes))
    except (KeyError, TypeError):
        return _decode_file_reference(fname, entry, fail)
    offsets = list(
        accumulate(map(mul, itemsizes, map(numel.__getitem__, tuples)), initial=data_start)
    )
    if offsets[-1] != size:
        return _decode_file_reference(fname, entry, fail)
    return _file_entry(size, data_start, names, dtypes, tuples, chunks, offsets)


def _decode_file_reference(
    fname: str, entry: object, fail: Callable[[str], Exception]
) -> FileEntry:
    """:func:`_decode_file` one tensor at a time: the plain statement of its checks (a
    property test, ``tests/checkpoint/test_fast_paths_manifest.py``, compares the two)."""
    size, data_start, names, dtypes, shapes, chunks = _file_columns(fname, entry, fail)
    for name in names:
        if type(name) is not str:
            raise fail(f"file {fname!r}: tensor name {name!r} is not a string")
    duplicate = first_duplicate(names)
    if duplicate is not None:
        raise fail(f"duplicate tensor name {duplicate!r}")
    for name, dtype in zip(names, dtypes):
        if type(dtype) is not str or dtype not in DTYPE_ITEMSIZE:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}")
    for name, shape in zip(names, shapes):
        if not (
            type(shape) is list
            and len(shape) <= _MAX_NDIM
            and all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
        ):
            raise _bad_shape(name, shape, fail)
    offsets = [data_start]
    for name, dtype, shape in zip(names, dtypes, shapes):
        nbytes = DTYPE_ITEMSIZE[dtype] * math.prod(shape)
        if offsets[-1] + nbytes > size:
            raise fail(
                f"tensor {name!r}: its {nbytes} bytes at {offsets[-1]} lie outside file "
                f"{fname!r} ({size} bytes)"
            )
        offsets.append(offsets[-1] + nbytes)
    if offsets[-1] != size:
        raise fail(f"file {fname!r}: its tensors end at byte {offsets[-1]}, the file at {size}")
    return _file_entry(size, data_start, names, dtypes, [tuple(s) for s in shapes], chunks, offsets)


def _file_columns(
    fname: str, entry: object, fail: Callable[[str], Exception]
) -> tuple[int, int, list[Any], list[Any], list[Any], list[tuple[int, str]]]:
    """A file entry's size, data start, columns (unchecked) and checksum runs (checked)."""
    if not is_plain_basename(fname) or fname == MANIFEST_NAME:
        raise fail(f"data file name {fname!r} is not a plain file name inside the checkpoint")
    if not isinstance(entry, dict):
        raise fail(f"file {fname!r}: entry is not a JSON object")
    size, data_start = entry.get("size"), entry.get("data_start")
    if not (_is_int(size) and _is_int(data_start)) or not 8 <= data_start <= size:
        raise fail(f"file {fname!r}: size {size!r} / data_start {data_start!r} out of bounds")
    names, dtypes, shapes, sums = (
        entry.get(k) for k in ("tensors", "dtypes", "shapes", "checksums")
    )
    if not (type(names) is list and type(dtypes) is list and type(shapes) is list):
        raise fail(f"file {fname!r}: 'tensors', 'dtypes' and 'shapes' must be lists")
    if not len(names) == len(dtypes) == len(shapes):
        raise fail(
            f"file {fname!r}: {len(names)} tensors but {len(dtypes)} dtypes and "
            f"{len(shapes)} shapes"
        )
    chunks = _chunk_plan(fname, sums, len(names), fail)
    return size, data_start, names, dtypes, shapes, chunks


def _file_entry(
    size: int,
    data_start: int,
    names: list[str],
    dtypes: list[str],
    shapes: list[tuple[int, ...]],
    chunks: list[tuple[int, str]],
    offsets: list[int],
) -> FileEntry:
    first = 0
    runs = []
    for count, digest in chunks:
        runs.append(Chunk(first, count, offsets[first], offsets[first + count], digest))
        first += count
    return FileEntry(
        size, data_start, tuple(names), tuple(dtypes), tuple(shapes), tuple(runs), offsets
    )


def _bad_shape(name: object, shape: object, fail: Callable[[str], Exception]) -> Exception:
    return fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")


def _chunk_plan(
    fname: str, value: object, count: int, fail: Callable[[str], Exception]
) -> list[tuple[int, str]]:
    """Validate ``checksums``: ``[count, digest]`` runs covering ``count`` tensors exactly."""
    if type(value) is not list:
        raise fail(f"file {fname!r}: 'checksums' is not a list")
    runs = []
    covered = 0
    for run in value:
        if (
            type(run) is not list
            or len(run) != 2
            or type(run[0]) is not int
            or run[0] < 1
            or type(run[1]) is not str
        ):
            raise fail(f"file {fname!r}: checksum entry {run!r} is not [tensor count, digest]")
        covered += run[0]
        runs.append((run[0], run[1]))
    if covered != count:
        raise fail(f"file {fname!r}: checksums cover {covered} tensors, the file holds {count}")
    return runs
