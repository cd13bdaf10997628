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
(``manifest_checksum``). Reading it back, which treats the file as hostile, is
``manifest_decode.py``.

Checksums are XXH3-128 (``xxhash``): ~35 GB/s on one core and it releases the GIL,
so a save spends well under 1% of its time on them (benchmarks/README.md).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from itertools import accumulate
from types import MappingProxyType
from typing import Any, NamedTuple

import xxhash

from trainhooks.checkpoint.format import bulk_json

__all__ = [
    "CHECKSUM_ALGORITHM",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GLOBAL_STEP_NAME",
    "MANIFEST_NAME",
    "MAX_MANIFEST_BYTES",
    "SEAL_KEY",
    "SEAL_LENGTH",
    "SHARDED_FORMAT_VERSION",
    "Chunk",
    "FileEntry",
    "Manifest",
    "TensorEntry",
    "TensorIndex",
    "checksum",
    "encode_json",
    "encode_manifest",
    "plan_chunks",
    "seal_manifest",
    "tensors_by_file",
]

FORMAT_NAME = "trainhooks.checkpoint"
#: The newest manifest version this trainhooks reads. A manifest is written as version 1
#: unless it holds sharded tensors (``sharded``, ``boxes.py``): then as version 2, so that
#: an older reader refuses it by its version instead of missing those tensors.
FORMAT_VERSION = 2
SHARDED_FORMAT_VERSION = 2
from trainhooks.checkpoint.storage.commit import MANIFEST_NAME  # noqa: E402

CHECKSUM_ALGORITHM = "xxh3_128"
#: The reserved tensor name under which the global step is stored (0-d I64).
GLOBAL_STEP_NAME = "global_step"
#: Readers refuse larger manifests unread. One takes ~30 bytes per tensor plus ~35 for
#: its place in the state tree: room for about a million tensors.
MAX_MANIFEST_BYTES = 64 * 2**20
#: The manifest's last key, its own checksum: ``,"manifest_checksum":"<32 hex>"}`` ends it.
SEAL_KEY = b',"manifest_checksum":"'
SEAL_LENGTH = len(SEAL_KEY) + 32 + 2


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
    """The decoded contents of ``manifest.json``.

    ``sharded`` maps each tensor stored as boxes to its ``boxes.ShardedEntry``.
    """

    global_step: int
    wall_time: float
    tree: Any
    metadata: dict[str, Any]
    files: dict[str, FileEntry]
    tensors: Mapping[str, TensorEntry]
    sharded: Mapping[str, Any] = MappingProxyType({})


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


def encode_json(value: Any, what: str, texts: bulk_json.Texts | None = None) -> str:
    """Compact JSON for ``value``; ValueError naming ``what`` if it is not JSON-serialisable.

    The text is ``json.dumps``'s, built in bulk for long lists (``bulk_json.py``, which
    says what ``texts`` may hold)."""
    try:
        return bulk_json.dumps(value, texts)
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def encode_manifest(
    manifest: Manifest,
    tree_json: str | None = None,
    heads: dict[int, tuple[FileEntry, bytes]] | None = None,
) -> list[bytes]:
    """Serialise ``manifest`` as compact UTF-8 JSON with its checksum sealed in.

    Returns the file's bytes as pieces to write in order (a 100k-tensor manifest is
    ~7 MB; joining would copy it twice more). ``tree_json`` is ``manifest.tree`` already
    encoded by :func:`encode_json`, if it was. Each file's tensors are written from the
    columns of its :class:`FileEntry` (``manifest.tensors`` is the index a decoded
    manifest adds). ``heads`` keeps each file's text but its checksums from one call to
    the next (a saver's): a file whose columns are the same tuples is not encoded again.
    """
    files: list[bytes] = []  # the files' entries as pieces: a head holds 100k names
    for name, f in manifest.files.items():
        comma = b"," if files else b""
        files += [comma + bulk_json.dumps(name).encode() + b":", _file_head(f, heads), _tail(f)]
    head = json.dumps(
        {
            "format": FORMAT_NAME,
            "version": SHARDED_FORMAT_VERSION if manifest.sharded else 1,
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
    if manifest.sharded:
        from trainhooks.checkpoint.format.boxes import encode_sharded

        sharded = encode_sharded(manifest.sharded)
        pieces.append(b',"sharded":' + json.dumps(sharded, separators=(",", ":")).encode())
    pieces += [b',"files":{', *files, b"}}"]
    del files
    length = sum(map(len, pieces))
    if length + SEAL_LENGTH > MAX_MANIFEST_BYTES:
        raise ValueError(
            f"the manifest would take {length} bytes, more than readers accept "
            f"({MAX_MANIFEST_BYTES}): save fewer, larger tensors (e.g. concatenate small "
            "ones) or less metadata"
        )
    hasher = xxhash.xxh3_128()
    for piece in pieces:
        hasher.update(piece)
    pieces[-1] = pieces[-1][:-1]  # the seal goes inside the object: see seal_manifest
    pieces.append(SEAL_KEY + hasher.hexdigest().encode("ascii") + b'"}')
    return pieces


def _file_head(f: FileEntry, heads: dict[int, tuple[FileEntry, bytes]] | None) -> bytes:
    """A file's entry up to its checksums: ``{"size":...,"checksums":``."""
    if heads is not None:
        known = heads.get(id(f.names))
        if known is not None:  # it holds the tuples it was made from: their ids are theirs
            k = known[0]
            if (
                k.names is f.names
                and k.dtypes is f.dtypes
                and k.shapes is f.shapes
                and (k.size, k.data_start) == (f.size, f.data_start)
            ):
                return known[1]
    columns = (bulk_json.dumps(f.names), bulk_json.dumps(f.dtypes), bulk_json.dumps(f.shapes))
    head = (
        f'{{"size":{f.size},"data_start":{f.data_start},"tensors":{columns[0]},'
        f'"dtypes":{columns[1]},"shapes":{columns[2]},"checksums":'
    ).encode()
    if heads is not None:
        heads[id(f.names)] = (f, head)
    return head


def _tail(f: FileEntry) -> bytes:
    """A file's entry from its checksums on."""
    return (bulk_json.dumps([[c.tensor_count, c.checksum] for c in f.chunks]) + "}").encode()


def seal_manifest(text: bytes) -> bytes:
    """Append the checksum of the JSON object ``text`` as its last key, ``manifest_checksum``.

    The result is still plain JSON; ``manifest_decode.decode_manifest`` recomputes the checksum
    over the object without that key, so a bit flip anywhere in the manifest (the
    tree, the metadata, a digit of the wall time) is caught.
    """
    if not text.endswith(b"}"):
        raise ValueError("a manifest is a JSON object")
    return text[:-1] + SEAL_KEY + checksum(text).encode("ascii") + b'"}'


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
