"""``manifest.json``: the commit record of a checkpoint directory, and its checksums.

The manifest is written last; a directory without one was never committed. It names
every data file (``{"size", "data_start"}``) and every tensor (``[file, dtype, shape,
[start, end], checksum]``, the byte range absolute in the file), and ends with its own
checksum (``manifest_checksum``). Decoding treats the file
as hostile: every field is type-checked and bounded before anything is allocated
from it, and any problem raises :class:`~trainhooks.errors.DataLossError`.

Checksums are XXH3-128 (``xxhash``): ~35 GB/s on one core and it releases the GIL,
so a save spends well under 1% of its time on them (benchmarks/README.md).
"""

from __future__ import annotations

import json
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
    "FileEntry",
    "Manifest",
    "TensorEntry",
    "checksum",
    "decode_manifest",
    "encode_json",
    "encode_manifest",
    "is_plain_basename",
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
# More dimensions than any framework supports (NumPy allows 64).
_MAX_NDIM = 64
_MAX_DIM = 2**63 - 1


def checksum(data: memoryview | bytes) -> str:
    """The checksum stored in manifests: XXH3-128 of ``data`` as 32 hex digits.

    Example:
        >>> checksum(b"")
        '99aa06d3014798d86001c324468d497f'
    """
    return xxhash.xxh3_128_hexdigest(data)


class FileEntry(NamedTuple):
    """One data file: its size and the offset where tensor bytes start (after the header)."""

    size: int
    data_start: int


class TensorEntry(NamedTuple):
    """One tensor: the file holding it, dtype code, shape, absolute byte range, checksum."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int
    checksum: str


class Manifest(NamedTuple):
    """The decoded contents of ``manifest.json``."""

    global_step: int
    wall_time: float
    tree: Any
    metadata: dict[str, Any]
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]


def encode_json(value: Any, what: str) -> str:
    """Compact JSON for ``value``; ValueError naming ``what`` if it is not JSON-serialisable."""
    try:
        return json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} is not JSON-serialisable: {e}") from None


def encode_manifest(manifest: Manifest, tree_json: str | None = None) -> bytes:
    """Serialise ``manifest`` as compact UTF-8 JSON, one tensor entry at a time.

    ``tree_json`` is ``manifest.tree`` already encoded by :func:`encode_json`, if it was.

    Tensor entries are formatted directly rather than through one big dict, so that a
    state of 100k tensors does not hold a second copy of itself as Python objects.
    """
    dumps = json.dumps
    files = ",".join(
        f'{dumps(name)}:{{"size":{f.size},"data_start":{f.data_start}}}'
        for name, f in manifest.files.items()
    )
    file_keys = {name: dumps(name) for name in manifest.files}
    tensors = ",".join(
        f'{dumps(name)}:[{file_keys[t.file]},"{t.dtype}",[{",".join(map(str, t.shape))}],'
        f'[{t.start},{t.end}],"{t.checksum}"]'
        for name, t in manifest.tensors.items()
    )
    head = dumps(
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
    text = (
        f'{head},"metadata":{metadata},"tree":{tree},"files":{{{files}}},"tensors":{{{tensors}}}}}'
    )
    return seal_manifest(text.encode("utf-8"))


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
    """``json.loads`` that refuses duplicate keys (a later entry must not shadow an earlier)."""
    return json.loads(bytes(raw).decode("utf-8"), object_pairs_hook=_no_duplicates)


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

    Checks the schema, that file names are plain basenames, that every byte range lies
    inside its file after the header and is exactly ``prod(shape) * itemsize`` bytes
    long, and that the global step is stored as a 0-d I64 tensor.

    Raises:
      DataLossError: anything is missing, malformed or out of bounds.
    """

    def fail(message: str) -> DataLossError:
        return DataLossError(f"Checkpoint {where}: {MANIFEST_NAME}: {message}")

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
    files = _decode_files(doc.get("files"), fail)
    tensors = _decode_tensors(doc.get("tensors"), files, fail)
    step_entry = tensors.get(GLOBAL_STEP_NAME)
    if step_entry is None or step_entry.dtype != "I64" or step_entry.shape != ():
        raise fail(f"the global step is not stored as a 0-d I64 tensor {GLOBAL_STEP_NAME!r}")
    return Manifest(global_step, float(wall_time), doc["tree"], metadata, files, tensors)


def _decode_files(value: object, fail: Any) -> dict[str, FileEntry]:
    if not isinstance(value, dict) or not value:
        raise fail("'files' is not a non-empty JSON object")
    files: dict[str, FileEntry] = {}
    for name, entry in value.items():
        if not is_plain_basename(name) or name == MANIFEST_NAME:
            raise fail(f"data file name {name!r} is not a plain file name inside the checkpoint")
        if not isinstance(entry, dict):
            raise fail(f"file {name!r}: entry is not a JSON object")
        size, start = entry.get("size"), entry.get("data_start")
        if not (_is_int(size) and _is_int(start)) or not 8 <= start <= size:
            raise fail(f"file {name!r}: size {size!r} / data_start {start!r} out of bounds")
        files[name] = FileEntry(size, start)
    return files


def _decode_tensors(
    value: object, files: dict[str, FileEntry], fail: Any
) -> dict[str, TensorEntry]:
    """Validate ``{name: [file, dtype, shape, [start, end], checksum]}``; one tight loop."""
    if not isinstance(value, dict):
        raise fail("'tensors' is not a JSON object")
    tensors: dict[str, TensorEntry] = {}
    itemsizes = DTYPE_ITEMSIZE
    for name, e in value.items():
        try:
            fname, dtype, shape, (start, end), sum_ = e
        except (TypeError, ValueError):
            raise fail(
                f"tensor {name!r}: entry {e!r} is not [file, dtype, shape, [start, end], checksum]"
            ) from None
        file = files.get(fname) if type(fname) is str else None
        if file is None:
            raise fail(f"tensor {name!r}: file {fname!r} is not listed in 'files'")
        nbytes = itemsizes.get(dtype) if type(dtype) is str else None
        if nbytes is None:
            raise fail(f"tensor {name!r}: unknown dtype {dtype!r}")
        if type(shape) is not list or len(shape) > _MAX_NDIM:
            raise fail(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        for d in shape:  # Python integers: a hostile shape cannot overflow to a small size
            if type(d) is not int or not 0 <= d <= _MAX_DIM:
                raise fail(
                    f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers"
                )
            nbytes *= d
        if type(start) is not int or type(end) is not int:
            raise fail(f"tensor {name!r}: byte range {[start, end]!r} is not two integers")
        if not file.data_start <= start <= end <= file.size:
            raise fail(
                f"tensor {name!r}: byte range [{start}, {end}) lies outside the data of "
                f"file {fname!r} ([{file.data_start}, {file.size}))"
            )
        if end - start != nbytes:
            raise fail(
                f"tensor {name!r}: byte range of {end - start} bytes does not hold "
                f"shape {shape} of {dtype}"
            )
        if type(sum_) is not str:
            raise fail(f"tensor {name!r}: checksum {sum_!r} is not a string")
        tensors[name] = TensorEntry(fname, dtype, tuple(shape), start, end, sum_)
    return tensors


def tensors_by_file(tensors: dict[str, TensorEntry]) -> dict[str, list[tuple[str, TensorEntry]]]:
    """Group tensor entries by data file, each group in file order."""
    groups: dict[str, list[tuple[str, TensorEntry]]] = {}
    for name, entry in tensors.items():
        groups.setdefault(entry.file, []).append((name, entry))
    for group in groups.values():
        group.sort(key=lambda item: item[1].start)
    return groups
