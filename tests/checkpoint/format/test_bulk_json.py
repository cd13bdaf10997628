"""``bulk_json.dumps`` (long lists encoded in bulk) against ``json.dumps``, its definition.

The manifest and the state tree are written with ``bulk_json``; readers parse them as
plain JSON, and a manifest's checksum is over its text, so the text must be exactly
``json.dumps(value, separators=(",", ":"))``'s for any value, long lists or not.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.helpers import json_values

from trainhooks.checkpoint.format.bulk_json import _LONG, dumps, is_plain, string_array
from trainhooks.checkpoint.state.tree import flatten_state


def reference(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


texts = st.text(st.characters(codec="utf-8"), max_size=4) | st.sampled_from(
    ["w", "a/b", 'q"', "b\\s", "\x00", "\x7f", "é", "\u2028", "\ud7ff"]
)
scalars = json_values.scalars(texts)


def shared(children: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return json_values.shared(children, _LONG)


values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(texts, children, max_size=3),
        st.dictionaries(
            st.one_of(st.integers(-3, 3), st.booleans(), st.none()), children, max_size=2
        ),
        shared(children),
        st.lists(texts, min_size=_LONG, max_size=_LONG + 3),
        st.lists(
            st.lists(st.integers(0, 3), max_size=2).map(tuple), min_size=_LONG, max_size=2 * _LONG
        ),
        st.lists(st.sampled_from([(1,), (True,), (1.0,), ([1],)]), min_size=_LONG, max_size=_LONG),
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(values)
def test_dumps_is_json_dumps(value: Any) -> None:
    assert dumps(value) == reference(value)


@given(st.lists(texts, max_size=2 * _LONG))
def test_string_array_is_json_dumps(strings: list[str]) -> None:
    assert string_array(strings) == reference(strings)
    assert string_array(tuple(strings)) == reference(strings)


@given(texts)
def test_a_plain_text_is_its_own_json_string(text: str) -> None:
    assert is_plain(text) == (reference(text) == f'"{text}"')


def test_the_tree_of_a_large_state_is_json_dumps() -> None:
    state: dict[str, Any] = {
        f"b{i // 100}/p{i % 100}": np.zeros(i % 3, np.float32) for i in range(500)
    }
    state["opt"] = {"lr": -0.0, "betas": (0.9, 0.999), "ids": list(range(200)), "nan": math.nan}
    tree = flatten_state(state).tree
    assert dumps(tree) == reference(tree)


@pytest.mark.parametrize(
    "value",
    [
        [float("nan")] * _LONG,
        [[1, 2]] * _LONG + [set()],
        {"a": [object()] * _LONG},
    ],
    ids=["nan", "a set", "an object"],
)
def test_what_json_dumps_refuses_or_writes_dumps_does_too(value: Any) -> None:
    try:
        expected = reference(value)
    except TypeError as e:
        with pytest.raises(TypeError, match=str(e)):
            dumps(value)
    else:
        assert dumps(value) == expected


def test_a_circular_list_is_refused() -> None:
    value: list[Any] = []
    value.append(value)
    with pytest.raises((ValueError, RecursionError)):
        dumps([value] * _LONG)


def test_texts_keep_the_encoding_of_the_lists_named_there() -> None:
    leaf = ["numpy", "F32", [2]]
    keys = [f"k{i}" for i in range(_LONG)]
    nodes = [leaf] * _LONG
    tree = {"dict": keys, "values": nodes, "other": [leaf] * _LONG}
    texts: dict[int, Any] = {id(keys): (keys, None), id(nodes): (nodes, None)}
    assert dumps(tree, texts) == reference(tree)
    assert texts[id(keys)] == (keys, reference(keys))
    assert texts[id(nodes)][1] == reference(nodes)
    assert len(texts) == 2  # a list not named there is not kept
    texts[id(nodes)] = (nodes, "[KEPT]")
    assert dumps(tree, texts) == reference(tree).replace(reference(nodes), "[KEPT]", 1)
    equal = list(nodes)  # an equal list, another object: encoded afresh
    assert dumps({"values": equal}, texts) == reference({"values": equal})
