"""``Restorer._restore_dict`` (a checked run, an inlined ``_plan_ndarray``) against its
plain reference, which restores every key through ``_restore`` and the array adapters.

For any saved state and any state restored into (matching, or with arrays of another
dtype, shape, layout or byte order, read-only, missing, extra or replaced by Python
values), both must report the same mismatches and leave the same values, in place.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.state import tree as tree_module
from trainhooks.checkpoint.state.tree import restore_state
from trainhooks.checkpoint.state.tree_restore import Restorer
from trainhooks.session.session import Session

DTYPES = ["<f4", "<i8", "|u1", "<f8", "|b1", "<i2"]
KEYS = ["a", "b", "c", "d", "e"]


class ReferenceRestorer(Restorer):
    _restore_dict = Restorer._restore_dict_reference


@contextmanager
def restorer(cls: type[Restorer]) -> Iterator[None]:
    with mock.patch.object(tree_module, "Restorer", cls):
        yield


# A leaf plan: ("array", dtype, shape) or ("value", python value); a dict plan: a dict.
array_leaves = st.tuples(
    st.just("array"), st.sampled_from(DTYPES), st.lists(st.integers(0, 3), max_size=2)
)
leaves = st.one_of(array_leaves, array_leaves, st.tuples(st.just("value"), st.integers(0, 9)))
plans = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.dictionaries(st.sampled_from(KEYS), children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), array_leaves, min_size=2),  # one checked run
    ),
    max_leaves=8,
)
saved_plans = st.dictionaries(st.sampled_from(KEYS), plans, min_size=1, max_size=5)
# How a target leaf differs from the saved one.
CHANGES = ["same", "dtype", "shape", "readonly", "strided", "fortran", "byteswapped",
           "value", "dict", "missing"]  # fmt: skip


def build(plan: Any, fill: int) -> Any:
    """The state a plan describes, every array filled from ``fill`` (fresh objects)."""
    if isinstance(plan, dict):
        return {key: build(child, fill) for key, child in plan.items()}
    if plan[0] == "value":
        return plan[1] + fill
    _, dtype, shape = plan
    size = int(np.prod(shape))
    return (np.arange(size) * 7 + fill).astype(dtype).reshape(shape)


@st.composite
def target_plans(draw: st.DrawFn, plan: Any, odds: int | None, root: bool = False) -> Any:
    """``plan`` with about one in ``odds`` of its nodes changed, removed, or added (none
    if ``odds`` is None)."""
    if odds is None:
        return plan
    if isinstance(plan, dict):
        if not root and draw(st.integers(0, 2 * odds)) == 0:
            return draw(leaves)  # a dict saved, an array or a value restored into
        out = {}
        for key, child in plan.items():
            changed = draw(target_plans(child, odds))
            if changed != "missing":
                out[key] = changed
        if draw(st.integers(0, 2 * odds)) == 0:
            out[draw(st.sampled_from([*KEYS, "x"]))] = draw(leaves)
        return out
    change = draw(st.sampled_from(CHANGES)) if draw(st.integers(0, odds)) == 0 else "same"
    if change == "missing":
        return change
    if plan[0] == "value":
        return draw(leaves) if change in ("dtype", "shape") else plan
    _, dtype, shape = plan
    if change == "dtype":
        return ("array", draw(st.sampled_from(DTYPES)), shape)
    if change == "shape":
        return ("array", dtype, draw(st.lists(st.integers(0, 3), max_size=2)))
    if change in ("readonly", "strided", "fortran", "byteswapped"):
        return ("array", dtype, shape, change)
    if change == "value":
        return ("value", 0)
    if change == "dict":
        return {"a": plan}
    return plan


def build_target(plan: Any) -> Any:
    if isinstance(plan, dict):
        return {key: build_target(child) for key, child in plan.items()}
    if plan[0] == "value" or len(plan) == 3:
        return build(plan, fill=1)
    _, dtype, _, how = plan
    array = build(plan[:3], fill=1)
    if how == "readonly":
        array.flags.writeable = False
    elif how == "strided":
        wide = np.zeros((*array.shape, 2), dtype)
        wide[..., 0] = array
        array = wide[..., 0]
    elif how == "fortran":
        array = np.asfortranarray(array)
    else:
        array = array.astype(np.dtype(dtype).newbyteorder())
    return array


def snapshot(state: Any) -> Any:
    """Everything a restore may change: values, dtypes, shapes, bytes, writability."""
    if isinstance(state, dict):
        return {key: snapshot(value) for key, value in state.items()}
    if isinstance(state, np.ndarray):
        return (state.dtype.str, state.shape, state.tobytes(), state.flags.writeable)
    return (type(state).__name__, state)


def objects(state: Any) -> list[int]:
    if isinstance(state, dict):
        return [i for value in state.values() for i in objects(value)]
    return [id(state)] if isinstance(state, np.ndarray) else []


def restored(
    cls: type[Restorer], target_plan: Any, prefix: str, locate: str
) -> tuple[Any, Any, bool]:
    """Restore into a fresh target: ``locate`` "none" (``TensorData`` only), "checked"
    (``locate`` checks each run on use) or "unchecked" (also ``locate_many``: the run)."""
    state = build_target(target_plan)
    arrays = objects(state)
    with open_checkpoint(prefix) as ckpt, restorer(cls):
        locator = None if locate == "none" else ckpt.locator(unchecked=locate == "unchecked")
        try:
            result: Any = restore_state(
                state, ckpt.tree, ckpt.tensor_data, strict=False, locate=locator
            )
        except Exception as e:  # both must fail alike, if at all
            result = (type(e).__name__, str(e))
    return result, snapshot(state), objects(state) == arrays


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), saved_plans, st.sampled_from(["none", "checked", "unchecked"]))
def test_fast_restore_agrees_with_the_reference(
    data: st.DataObject, saved_plan: dict[str, Any], locate: str
) -> None:
    odds = data.draw(st.sampled_from([None, 1, 4]))
    target_plan = data.draw(target_plans(saved_plan, odds, root=True))
    with tempfile.TemporaryDirectory() as directory:
        prefix = Saver().save(Session(build(saved_plan, fill=0)), f"{directory}/m", global_step=1)
        assert prefix is not None
        fast = restored(Restorer, target_plan, prefix, locate)
        assert fast == restored(ReferenceRestorer, target_plan, prefix, locate)
    assert fast[2]  # arrays restored in place, never replaced


def test_the_checked_run_and_the_inlined_copy_are_both_compared() -> None:
    """One dict all plain matching arrays (the run), one with a Python value among them
    (the per-key loop with the inlined ``_plan_ndarray``): same bits as the reference."""
    saved_plan = {
        "run": {k: ("array", "<f4", [3]) for k in KEYS},
        "loop": {**{k: ("array", "<i8", [2, 2]) for k in KEYS}, "x": ("value", 4)},
    }
    with tempfile.TemporaryDirectory() as directory:
        prefix = Saver().save(Session(build(saved_plan, fill=0)), f"{directory}/m", global_step=1)
        assert prefix is not None
        for locate in ("none", "checked", "unchecked"):
            fast = restored(Restorer, saved_plan, prefix, locate)
            assert fast == restored(ReferenceRestorer, saved_plan, prefix, locate)
            assert fast[0] == [] and fast[1] == snapshot(build(saved_plan, fill=0))
