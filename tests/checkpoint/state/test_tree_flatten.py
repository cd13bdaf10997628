"""The bulk path of a flatten (``Flattener.plain_dict_node``) and its memo, against the loop.

A dict of many plain NumPy arrays is flattened in bulk, and with a memo (a saver's)
reuses the previous walk's names, codes and nodes. Whatever the dict, the result must
be the one ``Flattener.dict_node``'s loop gives: the same tree, names, dtype codes,
shapes and sources, in the same order, and a memo must never hand back what a changed
state no longer has.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainhooks.checkpoint.state import tree_flatten
from trainhooks.checkpoint.state.tree import FlatState, flatten_state

BULK = tree_flatten._BULK


def flat_by_loop(state: dict[str, Any]) -> FlatState:
    with pytest.MonkeyPatch.context() as m:
        m.setattr(tree_flatten, "_BULK", 10**9)  # every dict through dict_node's loop
        return flatten_state(state)


def same(a: FlatState, b: FlatState) -> None:
    assert json.dumps(a.tree) == json.dumps(b.tree)
    ca, cb = a.tensors, b.tensors
    assert ca.names == cb.names  # type: ignore[attr-defined]
    assert ca.codes == cb.codes  # type: ignore[attr-defined]
    assert ca.shapes == cb.shapes  # type: ignore[attr-defined]
    assert [type(s) for s in ca.sources] == [type(s) for s in cb.sources]  # type: ignore[attr-defined]
    for name in ca:
        assert bytes(ca[name].buffer) == bytes(cb[name].buffer), name


ARRAYS = [
    lambda i: np.full(3, i, np.float32),
    lambda i: np.full((2, 2), i, np.int64),
    lambda i: np.array(i, np.int16),  # 0-d
    lambda i: np.arange(12, dtype=np.float64)[::3] + i,  # strided
    lambda i: np.full(2, i, ">i4"),  # big-endian: the adapter's path
    lambda i: np.zeros((0, 2), np.uint8),
    lambda i: np.array([i % 2], np.bool_),
    lambda i: np.full(2, i, np.longdouble),  # no safetensors code: refused, as by the loop
    lambda i: np.datetime64(i, "s"),  # a NumPy scalar, not an ndarray
    lambda i: i,  # a Python value
    lambda i: {"inner": np.full(1, i, np.float32)},
    lambda i: np.ma.masked_array([i]),  # an ndarray subclass
]


PLAIN = [0, 1, 2, 3, 5, 6]  # the plain arrays of ARRAYS, which the bulk path takes


@settings(max_examples=60, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(PLAIN), min_size=BULK, max_size=BULK + 8),
    others=st.lists(st.tuples(st.integers(0, BULK), st.sampled_from(range(len(ARRAYS))))),
    nested=st.booleans(),
    int_key=st.booleans(),
)
def test_the_bulk_path_flattens_as_the_loop(
    kinds: list[int], others: list[tuple[int, int]], nested: bool, int_key: bool
) -> None:
    for at, kind in others[:2]:
        kinds.insert(at, kind)
    entries: dict[Any, Any] = {f"k{i}": ARRAYS[k](i) for i, k in enumerate(kinds)}
    if int_key:
        entries[7] = np.ones(1, np.float32)
    state = {"model": entries} if nested else {str(k): v for k, v in entries.items()}
    try:
        expected = flat_by_loop(state)
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e), match="^" + re.escape(str(e)) + "$"):
            flatten_state(state)
        return
    same(flatten_state(state), expected)
    memo: dict[str, Any] = {}
    flatten_state(state, memo=memo)
    bulk = set(kinds) <= set(PLAIN) and not (nested and int_key)
    assert bool(memo) == bulk  # the bulk path took the dict
    same(flatten_state(state, memo=memo), expected)


def plain_state(n: int = 2 * BULK) -> dict[str, Any]:
    return {"model": {f"w{i}": np.full(4, i, np.float32) for i in range(n)}, "step": 3}


@pytest.mark.parametrize(
    "change",
    ["key renamed", "key added", "key dropped", "keys reordered", "dtype", "shape", "big-endian"],
)
def test_a_memo_is_not_reused_for_a_changed_dict(change: str) -> None:
    state = plain_state()
    memo: dict[str, Any] = {}
    flatten_state(state, memo=memo)
    model = state["model"]
    if change == "key renamed":
        model["renamed"] = model.pop("w5")
    elif change == "key added":
        model["extra"] = np.zeros(4, np.float32)
    elif change == "key dropped":
        del model["w0"]
    elif change == "keys reordered":
        state["model"] = dict(reversed(list(model.items())))
    elif change == "dtype":
        model["w3"] = model["w3"].astype(np.float64)
    elif change == "shape":
        model["w3"].shape = (2, 2)  # in place: the same array object
    else:
        model["w3"] = model["w3"].astype(">f4")
    same(flatten_state(state, memo=memo), flat_by_loop(state))


def test_a_memo_reads_the_arrays_of_this_call() -> None:
    state = plain_state()
    memo: dict[str, Any] = {}
    flatten_state(state, memo=memo)
    state["model"]["w1"][:] = 42  # in place
    state["model"]["w2"] = np.full(4, 7, np.float32)  # replaced
    flat = flatten_state(state, memo=memo)
    same(flat, flat_by_loop(state))
    assert flat.tensors["model/w2"].buffer.tobytes() == np.full(4, 7, np.float32).tobytes()
    assert flat.tensors["model/w1"].buffer.tobytes() == np.full(4, 42, np.float32).tobytes()


def test_a_memo_keeps_only_the_dicts_of_the_last_state() -> None:
    memo: dict[str, Any] = {}
    flatten_state(plain_state(), memo=memo)
    assert set(memo) == {"model"}
    flatten_state({"other": plain_state()["model"]}, memo=memo)
    assert set(memo) == {"other"}
    assert not any(isinstance(v, np.ndarray) for plan in memo.values() for v in plan)


def test_one_array_under_two_names_is_still_found() -> None:
    shared = np.zeros(4, np.float32)
    state = {f"w{i}": np.zeros(4, np.float32) for i in range(BULK)}
    state["tied"] = shared
    state["tied_too"] = shared
    flat = flatten_state(state, memo={})
    assert flat.tree["version"] == 3  # the tied node, as without the bulk path
