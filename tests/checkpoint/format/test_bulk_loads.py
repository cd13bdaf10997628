"""``bulk_loads.loads`` (long arrays of lists decoded in bulk) against ``json.loads``.

Whenever ``loads`` gives a value, ``json.loads`` must give the same one (types and key
order included), for any text: valid documents, hostile ones and broken ones. It may
give None (the caller then runs ``json.loads``), but for manifests as trainhooks writes
them it must not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import json_values

from trainhooks.checkpoint.format.bulk_loads import _LONG, loads
from trainhooks.checkpoint.format.manifest import MANIFEST_NAME
from trainhooks.checkpoint.format.manifest_decode import (
    _no_duplicates,
    _unseal,
    decode_manifest,
    strict_json_loads,
)
from trainhooks.checkpoint.saver import Saver

texts = st.text(st.characters(codec="utf-8"), max_size=3) | st.sampled_from(
    ["w", 'q"', "b\\s", "\x00", "\u00e9", '":[[1]]', "],["]
)
scalars = json_values.scalars(texts)


def shared(children: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return json_values.shared(children, _LONG)


# Items of the long arrays: scalars, shapes, leaf nodes and small containers of them
# (not themselves long: arrays of arrays of 128 items would make documents of megabytes).
lists = st.one_of(
    st.lists(st.integers(0, 3), max_size=2),
    st.tuples(st.sampled_from(["numpy", "torch"]), texts, st.lists(st.integers(0, 9))),
    st.lists(scalars, max_size=2),
    st.lists(st.lists(st.integers(0, 2), max_size=2), max_size=2),
)
items = scalars | lists | st.dictionaries(texts, scalars, max_size=2)
values = st.recursive(
    scalars | shared(items) | shared(lists),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(texts, children, max_size=3),
    ),
    max_leaves=12,
)


def reference(text: str) -> str:
    """``json.loads``'s value as ``repr`` shows it (1, 1.0 and True differ), or its error."""
    try:
        return repr(json.loads(text, object_pairs_hook=_no_duplicates))
    except (ValueError, RecursionError) as e:
        return f"refused: {type(e).__name__}"


def check(text: str) -> Any:
    """``loads(text)``, asserted equal to ``json.loads(text)`` when it is not None."""
    got = loads(text, _no_duplicates)
    if got is not None:
        assert repr(got) == reference(text)
    return got


leaf = st.sampled_from(
    ['["numpy","F32",[256]]', '["torch","BF16",[]]', '["torch","F32",[3,4]]', "[]", "[0]"]
)


def long_array(items: list[str], count: int) -> str:
    return "[" + ",".join(items[i % len(items)] for i in range(count)) + "]"


@settings(max_examples=300, deadline=None)
@given(values)
def test_any_document_decodes_as_json_does(value: Any) -> None:
    for separators in ((",", ":"), (", ", ": ")):
        check(json.dumps({"tree": value, "x": [value]}, separators=separators))


@settings(max_examples=300, deadline=None)
@given(st.lists(leaf, min_size=1, max_size=3), st.integers(_LONG, 3 * _LONG))
def test_long_arrays_of_lists_are_decoded_in_bulk(items: list[str], count: int) -> None:
    text = '{"a":{"values":' + long_array(items, count) + '},"shapes":' + long_array(items, count)
    assert check(text + "}") is not None


# Snippets that turn a document hostile: strings holding what looks like an array, the
# constants, escapes, numbers json refuses, whitespace, brackets out of place.
snippets = st.sampled_from(
    [
        '"', "\\", '\\"', ",", "[", "]", "],[", "]]", "{", "}", ":", " ", "\n", "-", "01",
        "1.0", "true", "NaN", "Infinity", "-Infinity", '":', '":[[1],[2]]', '"x":1',
        '"a\\":[[1],[1],[1]]"', "\x00", "\u00e9",
    ]
)  # fmt: skip


@settings(max_examples=800, deadline=None)
@given(
    st.lists(leaf, min_size=1, max_size=3),
    st.integers(_LONG, 2 * _LONG),
    st.lists(st.tuples(st.floats(0, 1), snippets, st.booleans()), min_size=1, max_size=3),
)
def test_a_hostile_document_is_never_decoded_otherwise_than_json_does(
    items: list[str], count: int, edits: list[tuple[float, str, bool]]
) -> None:
    text = '{"k":"v","values":' + long_array(items, count) + ',"s":' + long_array(items, count)
    text += "}"
    for where, snippet, replace in edits:
        at = int(where * len(text))
        text = text[:at] + snippet + text[at + (len(snippet) if replace else 0) :]
    check(text)


def test_an_array_inside_a_string_is_left_alone() -> None:
    inside = '\\":' + long_array(["[1]"], 2 * _LONG)
    for after in ("}", ',"values":' + long_array(["[2]"], _LONG) + "}"):
        check('{"s":"' + inside + '"' + after)  # json's value, or None


def test_a_long_array_that_is_no_member_value_is_left_to_json() -> None:
    assert check("[" + long_array(["[1]"], 2 * _LONG) + "]") is None
    assert check('{"a":' + long_array(["[1]"], _LONG - 1) + "}") is None  # too short


@pytest.mark.parametrize("own", ["NaN", "-Infinity", '"Infinity"'])
def test_a_document_with_constants_of_its_own_is_left_to_json(own: str) -> None:
    text = '{"a":' + long_array(["[1]"], _LONG) + ',"b":' + own + "}"
    assert check(text) is None


def test_a_document_nested_past_the_parsers_limit_is_refused_as_json_refuses_it() -> None:
    limit = sys.getrecursionlimit()
    for depth in range(limit - 8, limit + 4):
        array = '{"a":' + long_array(['["numpy","F32",[1]]'], _LONG) + "}"
        text = "[" * depth + array + "]" * depth
        got = check(text)
        if reference(text).startswith("refused"):
            assert got is None


def test_repeated_keys_are_refused() -> None:
    text = '{"a":' + long_array(["[1]"], _LONG) + ',"a":' + long_array(["[2]"], _LONG) + "}"
    assert check(text) is None
    with pytest.raises(ValueError, match="duplicate key 'a'"):
        strict_json_loads(text.encode())


class _Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.global_step = 7


@pytest.mark.parametrize("max_shard_bytes", [None, 2**14])
def test_a_manifest_of_many_tensors_decodes_in_bulk_as_json_does(
    tmp_path: Path, max_shard_bytes: int | None
) -> None:
    """Real manifests: every dtype, bfloat16, 0-d and empty tensors, non-ASCII names,
    one data file and several."""
    rng = np.random.default_rng(0)
    dtypes = [np.float32, np.float16, np.int64, np.uint8, np.bool_, np.complex64]
    state: dict[str, Any] = {
        f"blk{i // 50}/p{i % 50}": rng.random((i % 3, 2)).astype(dtypes[i % len(dtypes)])
        for i in range(300)
    }
    state["scalars"] = {f"s{i}": np.float64(i) * np.ones(()) for i in range(100)}
    state["caf\u00e9/\u4e2d"] = {f"w{i}": np.zeros(3, np.float32) for i in range(100)}
    state["bf16"] = {f"t{i}": torch.ones(i % 4, dtype=torch.bfloat16) for i in range(100)}
    saver = Saver(max_shard_bytes=max_shard_bytes)
    prefix = saver.save(_Holder(state), str(tmp_path / "model.ckpt"), global_step=7)
    raw = (Path(prefix) / MANIFEST_NAME).read_bytes()
    text = _unseal(raw)
    assert text is not None
    got = check(text.decode())
    assert got is not None  # the bulk path is the one taken
    manifest = decode_manifest(raw, prefix)
    files = got["files"]
    assert len(files) == (1 if max_shard_bytes is None else len(manifest.files)) >= 1
    for name, entry in manifest.files.items():
        assert list(entry.names) == files[name]["tensors"]
        assert [list(s) for s in entry.shapes] == files[name]["shapes"]
