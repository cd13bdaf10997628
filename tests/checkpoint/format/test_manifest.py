"""``encode_manifest``: the manifest's text, with and without a saver's memo of file entries.

The text is what ``json.dumps`` makes of the manifest as a dict (the format's
definition, ``docs/format.md``), sealed with its checksum; a memo (``heads``) that
reuses a file's entry from an earlier save must not change a byte, and must not be
used for a file whose columns or sizes are others.
"""

from __future__ import annotations

import json
from typing import Any

from trainhooks.checkpoint.format.manifest import (
    CHECKSUM_ALGORITHM,
    FORMAT_NAME,
    Chunk,
    FileEntry,
    Manifest,
    encode_manifest,
    seal_manifest,
)

NAMES = (*(f"layer{i}/w" for i in range(100)), "caf\u00e9", 'q"uote')


def entry(shift: int = 0, names: tuple[str, ...] = NAMES) -> FileEntry:
    shapes = tuple((i % 3, 2) for i in range(len(names)))
    dtypes = tuple("F32" if i % 2 else "I64" for i in range(len(names)))
    chunks = (Chunk(0, 60, 0, 0, "ab" * 16), Chunk(60, len(names) - 60, 0, 0, f"{shift:032x}"))
    return FileEntry(5000 + shift, 128, names, dtypes, shapes, chunks)


def manifest(files: dict[str, FileEntry]) -> Manifest:
    tree = {"version": 2, "frameworks": ["numpy"], "root": {"dict": [], "values": []}}
    return Manifest(7, 1.5, tree, {"note": "x"}, files, {})


def reference(m: Manifest) -> bytes:
    """The manifest as ``json.dumps`` writes the dict it stands for, sealed."""
    value: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": 1,
        "global_step": m.global_step,
        "wall_time": m.wall_time,
        "checksum_algorithm": CHECKSUM_ALGORITHM,
        "metadata": m.metadata,
        "tree": m.tree,
        "files": {
            name: {
                "size": f.size,
                "data_start": f.data_start,
                "tensors": f.names,
                "dtypes": f.dtypes,
                "shapes": f.shapes,
                "checksums": [[c.tensor_count, c.checksum] for c in f.chunks],
            }
            for name, f in m.files.items()
        },
    }
    return seal_manifest(json.dumps(value, separators=(",", ":")).encode())


def test_the_manifest_is_json_dumps_of_its_dict() -> None:
    m = manifest(
        {"data-00000-of-00002.safetensors": entry(), "data-00001-of-00002.safetensors": entry(1)}
    )
    text = b"".join(encode_manifest(m))
    assert text == reference(m)


def test_a_memo_of_file_entries_changes_no_byte() -> None:
    heads: dict[int, Any] = {}
    first = entry()
    for f in (first, first._replace(chunks=entry(9).chunks)):  # a later save: other checksums
        m = manifest({"data-00000-of-00001.safetensors": f})
        assert b"".join(encode_manifest(m, heads=heads)) == reference(m)
    assert len(heads) == 1
    # Not reused for equal columns in other tuples, nor for the same tuples in another size.
    for f in (entry(), first._replace(size=first.size + 8), entry(names=(*NAMES[:-1], "x"))):
        m = manifest({"data-00000-of-00001.safetensors": f})
        assert b"".join(encode_manifest(m, heads=heads)) == reference(m)
