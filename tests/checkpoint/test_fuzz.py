"""Property-based fuzzing of the two parsers that read untrusted bytes: manifests and headers.

Whatever the bytes, decoding either succeeds with a manifest whose every byte range lies
inside its file and matches its shape, or raises ``DataLossError``; opening and verifying
a checkpoint built from fuzzed files raises only the library's errors. The manifests are
resealed, so the fuzzing reaches past the checksum. ``fuzz/fuzz_checkpoint.py`` is the
coverage-guided (atheris) counterpart.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainhooks import errors
from trainhooks.checkpoint.format.datafile import check_header, read_header
from trainhooks.checkpoint.format.manifest import (
    MANIFEST_NAME,
    FileEntry,
    seal_manifest,
    tensors_by_file,
)
from trainhooks.checkpoint.format.manifest_decode import decode_manifest
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session

EXAMPLES = 300
_FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _valid() -> tuple[dict[str, Any], dict[str, bytes]]:
    with tempfile.TemporaryDirectory() as d:
        state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.int8(3), "s": "x"}
        Saver().save(Session(state, global_step=5), os.path.join(d, "m"), global_step=5)
        prefix = os.path.join(d, "m-5")
        files = {n: _read(os.path.join(prefix, n)) for n in os.listdir(prefix)}
    doc = json.loads(files.pop(MANIFEST_NAME))
    del doc["manifest_checksum"]
    return doc, files


VALID_DOC, VALID_FILES = _valid()
(DATA_NAME,) = VALID_FILES

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from([DATA_NAME, "F32", "I64", "../x", "/etc/passwd", "__metadata__"]),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


@st.composite
def mutated_docs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid manifest with a few fields, at any depth, replaced, added or removed."""
    doc = json.loads(json.dumps(VALID_DOC))
    for _ in range(draw(st.integers(1, 4))):
        node: Any = doc
        path = []
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(
                st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node)))
            )
            path.append((node, key))
            node = node[key]
        if not path:
            continue
        parent, key = path[-1]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[key] = draw(json_values)
        elif action == "delete" and isinstance(parent, dict):
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return doc


def _check_invariants(manifest: Any) -> None:
    for name, t in manifest.tensors.items():
        file = manifest.files[t.file]
        assert file.data_start <= t.start <= t.end <= file.size, name
        assert t.end - t.start == DTYPE_ITEMSIZE[t.dtype] * math.prod(t.shape), name
        assert all(d >= 0 for d in t.shape), name


@_FUZZ
@given(mutated_docs())
def test_mutated_manifests_decode_or_raise_data_loss(doc: dict[str, Any]) -> None:
    raw = seal_manifest(json.dumps(doc, separators=(",", ":")).encode())
    try:
        manifest = decode_manifest(raw, "fuzz")
    except errors.DataLossError:
        return
    _check_invariants(manifest)


@_FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_manifest_bytes_decode_or_raise_data_loss(raw: bytes) -> None:
    for candidate in (raw, seal_manifest(raw + b"}") if raw.startswith(b"{") else raw):
        try:
            _check_invariants(decode_manifest(candidate, "fuzz"))
        except errors.DataLossError:
            pass


@_FUZZ
@given(
    st.binary(max_size=300),
    st.integers(0, 2**64 - 1),
    st.integers(0, 400),
    st.integers(0, 400),
)
def test_data_file_headers_are_checked_or_raise_data_loss(
    body: bytes, length: int, data_start: int, size: int
) -> None:
    data = struct.pack("<Q", length) + body

    def fail(message: str) -> errors.DataLossError:
        return errors.DataLossError(message)

    manifest = decode_manifest(seal_manifest(json.dumps(VALID_DOC).encode()), "fuzz")
    expected = tensors_by_file(manifest.tensors)[DATA_NAME]
    try:
        header = read_header(data, len(data), fail)  # type: ignore[arg-type]
        assert len(header) <= len(data)
        check_header(header, FileEntry(size, data_start), expected, fail)
    except errors.DataLossError:
        return
    # Accepted: then it is byte for byte the header trainhooks writes.
    assert header == VALID_FILES[DATA_NAME][: len(header)]


@pytest.mark.slow  # hypothesis: hundreds of checkpoints written and opened
@_FUZZ
@given(mutated_docs(), st.binary(max_size=64), st.integers(0, 400))
def test_checkpoints_from_fuzzed_files_open_verified_or_raise(
    doc: dict[str, Any], junk: bytes, at: int
) -> None:
    data = VALID_FILES[DATA_NAME]
    if junk:
        data = data[:at] + junk + data[at + len(junk) :]
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "m-5")
        os.mkdir(prefix)
        with open(os.path.join(prefix, MANIFEST_NAME), "wb") as f:
            f.write(seal_manifest(json.dumps(doc, separators=(",", ":")).encode()))
        listed = doc.get("files")
        for name in listed if isinstance(listed, dict) and listed else [DATA_NAME]:
            plain = isinstance(name, str) and "/" not in name and "\0" not in name
            if plain and name not in ("", ".", "..", MANIFEST_NAME):
                with open(os.path.join(prefix, name), "wb") as f:
                    f.write(data)
        try:
            with open_checkpoint(prefix) as ckpt:
                ckpt.verify()
                for name in ckpt.names:
                    ckpt.tensor_data(name)
        except errors.Error:
            pass
