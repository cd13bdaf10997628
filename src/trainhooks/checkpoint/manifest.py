"""``manifest.json``: the commit record of a checkpoint directory, and its checksums.

The manifest is written last; a directory without one was never committed. It lists
every data file with the tensors it holds, in file order, as columns (one JSON array
per field, so that a state of 100k tensors parses in milliseconds)::

    "files": {"data-00000-of-00001.safetensors": {
        "size": 3104, "data_start": 192,
        "tensors": ["global_step", "w", ...], "dtypes": ["I64", "F32", ...],
        "shapes": [[], [3, 4], ...], "checksums": [[1, "<32 hex>"], [40, "<32 hex>"], ...]}}

Tensors lie back to back from ``data_start``, so their byte ranges follow from their
dtypes and shapes. ``checksums`` covers them in runs: ``[count, digest]`` is the
checksum of the next ``count`` tensors' bytes taken together. A large tensor has its
own; small ones share one per ~1 MiB, so a state of many small tensors costs a few
hundred checksums rather than one per tensor. The manifest ends with its own checksum
(``manifest_checksum``). Decoding treats the file as hostile: every field is
type-checked and bounded before anything is allocated from it, and any problem raises
:class:`~trainhooks.errors.DataLossError`.

Checksums are XXH3-128 (``xxhash``): ~35 GB/s on one core and it releases the GIL,
so a save spends well under 1% of its time on them (benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from bisect import bisect_right
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate
from operator import mul
from typing import Any, NamedTuple, TypeGuard

import xxhash

from trainhooks.checkpoint.tensor import DTYPE_ITEMSIZE
from trainhooks.errors import DataLossError

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GLOBAL_STEP_NAME",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "Chunk",
    "FileEntry",
    "Manifest",
    "TensorEntry",
    "TensorIndex",
    "checksum",
    "decode_manifest",
    "encode_json",
    "encode_manifest",
    "is_plain_basename",
    "paused_gc",
    "plan_chunks",
    "seal_manifest",
    "strict_json_loads",
    "tensors_by_file",
]

FORMAT_NAME = "trainhooks.checkpoint"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CHECKSUM_ALGORITHM = "xxh3_128"
#: The reserved tensor name under which the global step is stored (0-d I64).
GLOBAL_STEP_NAME = "global_step"
#: Readers refuse larger manifests unread. One takes ~30 bytes per tensor plus ~35 for
#: its place in the state tree: room for about a million tensors.
MAX_MANIFEST_BYTES = 64 * 2**20
# More dimensions than any framework supports (NumPy allows 64).
_MAX_NDIM = 64
_MAX_DIM = 2**63 - 1


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of allocations (parsing a manifest,
    flattening or restoring a state of 100k tensors).

    Those create hundreds of thousands of containers, none of them garbage; each
    automatic collection on the way would walk every object of the process. Pausing
    made such a burst 2-5x faster (benchmarks/README.md). Only re-enables the collector
    if it was enabled on entry.

    Example:
        >>> with paused_gc():
        ...     rows = [[i] for i in range(3)]
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def checksum(data: memoryview | bytes) -> str:
    """The checksum stored in manifests: XXH3-128 of ``data`` as 32 hex digits.

    Example:
        >>> checksum(b"")
        '99aa06d3014798d86001c324468d497f'
    """
    return xxhash.xxh3_128_hexdigest(data)


class Chunk(NamedTuple):
    """A run of consecutive tensors of one file that share a checksum.

    ``first`` and ``tensor_count`` index the file's tensors (file order); ``start``/``end`` is
    the run's absolute byte range in the file.
    """

    first: int
    tensor_count: int
    start: int
    end: int
    checksum: str


class FileEntry(NamedTuple):
    """One data file: its size, where tensor bytes start, and its tensors as columns.

    ``names``, ``dtypes`` and ``shapes`` list the file's tensors in file order;
    ``chunks`` their checksum runs.
    """

    size: int
    data_start: int
    names: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    shapes: tuple[tuple[int, ...], ...] = ()
    chunks: tuple[Chunk, ...] = ()
    #: where each tensor starts, then the end of the last (set when decoded)
    offsets: Sequence[int] = ()


class TensorEntry(NamedTuple):
    """One tensor: its file, dtype code, shape, absolute byte range, and checksum run.

    ``chunk`` indexes ``FileEntry.chunks`` of its file.
    """

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    chunk: int


class Manifest(NamedTuple):
    """The decoded contents of ``manifest.json``."""

    global_step: int
    wall_time: float
    tree: Any
    metadata: dict[str, Any]
    files: dict[str, FileEntry]
    tensors: Mapping[str, TensorEntry]


class TensorIndex(Mapping[str, TensorEntry]):
    """Every tensor of a decoded manifest by name, its :class:`TensorEntry` built on lookup.

    A manifest of 100k tensors keeps them as its files' columns; only a name -> position
    dict is made per tensor.
    """

    def __init__(self, files: dict[str, FileEntry], index: dict[str, int]) -> None:
        self._files = list(files.items())
        self._firsts = list(accumulate((len(f.names) for _, f in self._files), initial=0))
        self._chunk_firsts = [[c.first for c in f.chunks] for _, f in self._files]
        self._index = index

    @property
    def positions(self) -> dict[str, int]:
        """Name -> position among all tensors, files in manifest order."""
        return self._index

    def locate(self, name: str) -> tuple[str, FileEntry, int]:
        """(file name, its entry, the tensor's position in it); KeyError if absent."""
        i = self._index[name]
        k = bisect_right(self._firsts, i) - 1
        fname, entry = self._files[k]
        return fname, entry, i - self._firsts[k]

    def __getitem__(self, name: str) -> TensorEntry:
        i = self._index[name]
        k = bisect_right(self._firsts, i) - 1
        fname, f = self._files[k]
        i -= self._firsts[k]
        chunk = bisect_right(self._chunk_firsts[k], i) - 1
        return TensorEntry(fname, f.dtypes[i], f.shapes[i], f.offsets[i], f.offsets[i + 1], chunk)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index


def encode_json(value: Any, what: str) -> str:
    """Compact JSON for ``value``; ValueError naming ``what`` if it is not JSON-serialisable."""
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def encode_manifest(manifest: Manifest, tree_json: str | None = None) -> list[bytes]:
    """Serialise ``manifest`` as compact UTF-8 JSON with its checksum sealed in.

    Returns the file's bytes as pieces to write in order (a 100k-tensor manifest is
    ~7 MB; joining would copy it twice more). ``tree_json`` is ``manifest.tree`` already
    encoded by :func:`encode_json`, if it was. Each file's tensors are written from the
    columns of its :class:`FileEntry` (``manifest.tensors`` is the index a decoded
    manifest adds).
    """
    files = {
        name: {
            "size": f.size,
            "data_start": f.data_start,
            "tensors": f.names,
            "dtypes": f.dtypes,
            "shapes": f.shapes,
            "checksums": [[c.tensor_count, c.checksum] for c in f.chunks],
        }
        for name, f in manifest.files.items()
    }
    head = json.dumps(
        {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "global_step": manifest.global_step,
            "wall_time": manifest.wall_time,
            "checksum_algorithm": CHECKSUM_ALGORITHM,
        },
        separators=(",", ":"),
    )[:-1]
    tree = encode_json(manifest.tree, "the state tree") if tree_json is None else tree_json
    metadata = encode_json(manifest.metadata, "metadata")
    pieces = [f'{head},"metadata":{metadata},"tree":'.encode(), tree.encode()]
    del tree
    pieces.append(b',"files":' + json.dumps(files, separators=(",", ":")).encode() + b"}")
    length = sum(map(len, pieces))
    if length + _SEAL_LEN > MAX_MANIFEST_BYTES:
        raise ValueError(
            f"the manifest would take {length} bytes, more than readers accept "
            f"({MAX_MANIFEST_BYTES}): save fewer, larger tensors (e.g. concatenate small "
            "ones) or less metadata"
        )
    hasher = xxhash.xxh3_128()
    for piece in pieces:
        hasher.update(piece)
    pieces[-1] = pieces[-1][:-1]  # the seal goes inside the object: see seal_manifest
    pieces.append(_SEAL_KEY + hasher.hexdigest().encode("ascii") + b'"}')
    return pieces


_SEAL_KEY = b',"manifest_checksum":"'
_SEAL_LEN = len(_SEAL_KEY) + 32 + 2


def seal_manifest(text: bytes) -> bytes:
    """Append the checksum of the JSON object ``text`` as its last key, ``manifest_checksum``.

    The result is still plain JSON; :func:`decode_manifest` recomputes the checksum
    over the object without that key, so a bit flip anywhere in the manifest (the
    tree, the metadata, a digit of the wall time) is caught.
    """
    if not text.endswith(b"}"):
        raise ValueError("a manifest is a JSON object")
    return text[:-1] + _SEAL_KEY + checksum(text).encode("ascii") + b'"}'


def _unseal(raw: bytes) -> bytes | None:
    """The manifest without its checksum key if the checksum matches, else None."""
    tail = raw[-_SEAL_LEN:]
    if len(raw) < _SEAL_LEN + 2 or not tail.startswith(_SEAL_KEY) or not tail.endswith(b'"}'):
        return None
    text = raw[:-_SEAL_LEN] + b"}"
    return text if checksum(text).encode("ascii") == tail[len(_SEAL_KEY) : -2] else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {dup!r}")
    return result


def strict_json_loads(raw: bytes | memoryview) -> Any:
    """``json.loads`` that refuses duplicate keys (a later entry must not shadow an earlier).

    JSON nested too deeply for the parser raises ValueError rather than RecursionError.
    """
    try:
        return json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


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
        doc = strict_json_loads(text)
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
    for name, entry in files_doc.items():
        files[name] = f = _decode_file(name, entry, fail)
        unique = set(f.names)
        if len(unique) != len(f.names) or not unique.isdisjoint(index):
            seen = set(index)
            dup = next(n for n in f.names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            raise fail(f"duplicate tensor name {dup!r}")
        index.update(zip(f.names, range(len(index), len(index) + len(f.names))))
    tensors = TensorIndex(files, index)
    step_entry = tensors.get(GLOBAL_STEP_NAME)
    if step_entry is None or step_entry.dtype != "I64" or step_entry.shape != ():
        raise fail(f"the global step is not stored as a 0-d I64 tensor {GLOBAL_STEP_NAME!r}")
    return Manifest(global_step, float(wall_time), doc["tree"], metadata, files, tensors)


def _decode_file(fname: str, entry: object, fail: Callable[[str], Exception]) -> FileEntry:
    """Validate one file's columns; a few passes in C over them, Python per distinct shape."""
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
    for name in names if set(map(type, names)) - {str} else ():
        if type(name) is not str:
            raise fail(f"file {fname!r}: tensor name {name!r} is not a string")
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
        raise fail(f"duplicate tensor name {dup!r}")
    itemsizes = DTYPE_ITEMSIZE
    for name, dtype in zip(names, dtypes):
        if type(dtype) is not str or dtype not in itemsizes:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}")
    if shapes and set(map(type, shapes)) != {list}:
        shape = next(s for s in shapes if type(s) is not list)
        raise _bad_shape(names[shapes.index(shape)], shape, fail)
    tuples = list(map(tuple, shapes))
    try:
        distinct = set(tuples)
    except TypeError:  # an unhashable dimension: not an int
        distinct = set()
        for name, shape in zip(names, tuples):
            try:
                hash(shape)
            except TypeError:
                raise _bad_shape(name, list(shape), fail) from None
    numel: dict[tuple[Any, ...], int] = {}
    for shape in distinct:
        # Python integers: a hostile shape cannot overflow to a small size
        if len(shape) > _MAX_NDIM or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape):
            raise _bad_shape(names[tuples.index(shape)], list(shape), fail)
        numel[shape] = math.prod(shape)
    # One tuple per distinct shape: 100k live tuples would cost memory and a GC pass.
    tuples = list(map({t: t for t in distinct}.__getitem__, tuples))
    sizes = list(map(mul, map(itemsizes.__getitem__, dtypes), map(numel.__getitem__, tuples)))
    offsets = list(accumulate(sizes, initial=data_start))
    if offsets[-1] > size:
        i = bisect_right(offsets, size) - 1  # the first tensor ending past the file
        raise fail(
            f"tensor {names[i]!r}: its {sizes[i]} bytes at {offsets[i]} lie outside file "
            f"{fname!r} ({size} bytes)"
        )
    if offsets[-1] != size:
        raise fail(f"file {fname!r}: its tensors end at byte {offsets[-1]}, the file at {size}")
    first = 0
    runs = []
    for count, digest in chunks:
        runs.append(Chunk(first, count, offsets[first], offsets[first + count], digest))
        first += count
    return FileEntry(
        size, data_start, tuple(names), tuple(dtypes), tuple(tuples), tuple(runs), offsets
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


def tensors_by_file(tensors: Mapping[str, TensorEntry]) -> dict[str, list[tuple[str, TensorEntry]]]:
    """Group tensor entries by data file, each group in file order."""
    groups: dict[str, list[tuple[str, TensorEntry]]] = {}
    for name, entry in tensors.items():
        groups.setdefault(entry.file, []).append((name, entry))
    for group in groups.values():
        group.sort(key=lambda item: item[1].start)
    return groups


def plan_chunks(sizes: Sequence[int], chunk_bytes: int) -> list[int]:
    """Split tensors of ``sizes`` bytes (file order) into checksum runs; returns run lengths.

    A run closes before a tensor that would take it past ``chunk_bytes``, so a tensor of
    at least ``chunk_bytes`` has a checksum of its own.

    Example:
        >>> plan_chunks([10, 10, 100, 10], chunk_bytes=50)
        [2, 1, 1]
    """
    runs: list[int] = []
    count = total = 0
    for n in sizes:
        if count and total + n > chunk_bytes:
            runs.append(count)
            count = total = 0
        count += 1
        total += n
    if count:
        runs.append(count)
    return runs
