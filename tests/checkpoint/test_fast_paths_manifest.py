"""``manifest_decode._decode_file`` (bulk passes in C) against its plain reference.

A file entry of the manifest comes from anywhere: for every entry, valid or hostile,
the fast path must decode to the same ``FileEntry`` or raise the same error as
``_decode_file_reference``, which checks one tensor at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trainhooks.checkpoint.format.manifest import MANIFEST_NAME, FileEntry, seal_manifest
from trainhooks.checkpoint.format.manifest_decode import (
    _decode_file,
    _decode_file_reference,
    _index_file,
    decode_manifest,
)
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE
from trainhooks.checkpoint.saver import Saver
from trainhooks.errors import DataLossError

FILE = "data-00000-of-00001.safetensors"
DTYPES = sorted(DTYPE_ITEMSIZE)

names = st.text("abc/", max_size=3)  # few enough that names repeat
shapes = st.lists(st.integers(0, 3), max_size=3)
# What a JSON document can hold where a name, dtype, shape or dimension belongs.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.0, 1.0, 2.0, -0.0, 1.5, math.inf]),
    st.text("ab", max_size=2),
)
json_values = st.one_of(
    json_scalars,
    st.lists(json_scalars, max_size=2),
    st.dictionaries(st.text("ab", max_size=1), json_scalars, max_size=1),
)
# Out of bounds or not integers; beside a 0 dimension, the tensor still has 0 bytes.
bad_dims = st.one_of(
    st.sampled_from([-1, 2**63, 2**63 - 1, 2**64, True, False, 1.0, 0.0]),
    json_values,
)


def _size(dtypes: list[str], shapes: list[list[int]], data_start: int) -> int:
    return data_start + sum(DTYPE_ITEMSIZE[d] * math.prod(s) for d, s in zip(dtypes, shapes))


@st.composite
def file_entries(draw: st.DrawFn) -> dict[str, Any]:
    """A valid file entry, or one with a few of its fields or items made wrong."""
    count = draw(st.integers(0, 6))
    entry: dict[str, Any] = {
        "tensors": draw(st.lists(names, min_size=count, max_size=count, unique=True)),
        "dtypes": draw(st.lists(st.sampled_from(DTYPES), min_size=count, max_size=count)),
        "shapes": draw(st.lists(shapes, min_size=count, max_size=count)),
        "data_start": draw(st.integers(8, 40)),
    }
    entry["size"] = _size(entry["dtypes"], entry["shapes"], entry["data_start"])
    runs, left = [], count
    while left:
        n = draw(st.integers(1, left))
        runs.append([n, draw(st.text("0123456789abcdef", min_size=1, max_size=4))])
        left -= n
    entry["checksums"] = runs
    for _ in range(draw(st.integers(0, 3))):
        column = draw(st.sampled_from(["tensors", "dtypes", "shapes", "dims", "size", "other"]))
        if column == "size" and type(entry["size"]) is int:
            entry["size"] += draw(st.sampled_from([-8, -4, -2, -1, 1, 2, 4]))
        elif column == "other":
            key = draw(st.sampled_from(["size", "data_start", "checksums", "tensors"]))
            entry[key] = draw(json_values)
        elif column == "dims":
            if entry["shapes"] and type(entry["shapes"][0]) is list:
                i = draw(st.integers(0, len(entry["shapes"]) - 1))
                shape = entry["shapes"][i]
                if type(shape) is list and draw(st.booleans()):
                    shape.insert(draw(st.integers(0, len(shape))), draw(bad_dims))
                elif type(shape) is list:
                    shape.extend([1] * (65 - len(shape)))  # too many dimensions, same size
        elif type(entry[column]) is list and entry[column]:
            items = entry[column]
            i = draw(st.integers(0, len(items) - 1))
            items[i] = draw(
                st.one_of(json_values, st.sampled_from(items))  # a repeated name too
                if column == "tensors"
                else st.one_of(json_values, st.sampled_from(["F31", "f32", "BF16"]))
                if column == "dtypes"
                else st.one_of(json_values, shapes)
            )
    return entry


def decode_and_index(fname: str, entry: Any, fail: Any) -> FileEntry:
    """The fast path as ``decode_manifest`` runs it: a repeated name is found by the index."""
    decoded = _decode_file(fname, entry, fail)
    _index_file({}, {fname: decoded}, fname, fail)
    return decoded


def outcome(decode: Any, fname: str, entry: Any) -> tuple[str, Any]:
    """The decoded entry, or the message of the error raised."""
    try:
        return "decoded", decode(fname, entry, ValueError)
    except ValueError as e:
        return "refused", str(e)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(file_entries(), st.sampled_from([FILE, FILE, "..", "a/b", "manifest.json"]))
# Regressions: a float or bool dimension equal to an earlier int shape's passed as it.
@example({"tensors": ["a", "b"], "dtypes": ["F32"] * 2, "shapes": [[1], [1.0]],
          "size": 16, "data_start": 8, "checksums": [[2, "0"]]}, FILE)  # fmt: skip
@example({"tensors": ["a", "b"], "dtypes": ["F32"] * 2, "shapes": [[1], [True]],
          "size": 16, "data_start": 8, "checksums": [[2, "0"]]}, FILE)  # fmt: skip
@example({"tensors": ["a"], "dtypes": ["U8"], "shapes": [[0, 2**63]],
          "size": 8, "data_start": 8, "checksums": [[1, "0"]]}, FILE)  # fmt: skip
@example({"tensors": ["a"], "dtypes": ["U8"], "shapes": [[-1, 0]],
          "size": 8, "data_start": 8, "checksums": [[1, "0"]]}, FILE)  # fmt: skip
@example({"tensors": ["a"], "dtypes": ["U8"], "shapes": [[1] * 65],
          "size": 9, "data_start": 8, "checksums": [[1, "0"]]}, FILE)  # fmt: skip
def test_fast_decode_agrees_with_the_reference(entry: dict[str, Any], fname: str) -> None:
    fast = outcome(decode_and_index, fname, entry)
    assert fast == outcome(_decode_file_reference, fname, entry)
    if fast[0] == "decoded":  # one tuple per distinct shape, equal to the saved lists
        shapes = fast[1].shapes
        assert len({id(s) for s in shapes}) == len(set(shapes))
        assert [list(s) for s in shapes] == entry["shapes"]


@pytest.mark.parametrize(
    ("shapes", "error"),
    [
        ([[1], [1.0]], "tensor 'b': shape [1.0] is not"),
        ([[1], [True]], "tensor 'b': shape [True] is not"),
        ([[-1], 5], "tensor 'a': shape [-1] is not"),  # the first bad shape, in file order
        ([[[1]], "x"], "tensor 'a': shape [[1]] is not"),
    ],
)
def test_the_first_bad_shape_in_file_order_is_named(shapes: list[Any], error: str) -> None:
    entry = {
        "tensors": ["a", "b"],
        "dtypes": ["F32", "F32"],
        "shapes": shapes,
        "size": 16,
        "data_start": 8,
        "checksums": [[2, "0"]],
    }
    for decode in (_decode_file, _decode_file_reference):
        with pytest.raises(ValueError, match=error.replace("[", r"\[")):
            decode(FILE, entry, ValueError)


def test_a_name_repeated_in_a_later_file_is_named_before_that_files_other_problems(
    tmp_path: Path,
) -> None:
    """Each file's names are indexed before the next file is read, as its checks run."""
    state = {f"t{i}": np.full(64, i, np.float32) for i in range(8)}
    prefix = Saver(max_shard_bytes=600).save(_Holder(state), str(tmp_path / "m"), global_step=1)
    doc = json.loads((Path(prefix) / MANIFEST_NAME).read_bytes())
    del doc["manifest_checksum"]
    entries = list(doc["files"].values())
    assert len(entries) >= 3
    entries[1]["tensors"][-1] = entries[0]["tensors"][-1]  # a name of the first file
    saved_dtype = entries[1]["dtypes"][0]
    entries[1]["dtypes"][0] = "F31"  # and a bad dtype in the same, later file
    entries[2]["dtypes"][0] = "F31"  # and in the one after
    raw = seal_manifest(json.dumps(doc, separators=(",", ":")).encode())
    with pytest.raises(DataLossError, match="unknown dtype 'F31'"):
        decode_manifest(raw, prefix)
    entries[1]["dtypes"][0] = saved_dtype  # the repeat is now the first problem
    raw = seal_manifest(json.dumps(doc, separators=(",", ":")).encode())
    with pytest.raises(DataLossError, match=f"duplicate tensor name '{entries[0]['tensors'][-1]}'"):
        decode_manifest(raw, prefix)


class _Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.global_step = 1
