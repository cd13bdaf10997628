"""checkpoint/state/tree.py: state -> named tensors + JSON tree -> state, in place and bit-exact."""

from __future__ import annotations

import collections
import json
import logging
import math
import struct
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state.tree import (
    FlatState,
    StateMismatchError,
    check_state,
    flatten_state,
    restore_state,
)


def _save(state: dict[str, Any]) -> FlatState:
    """flatten -> copy the bytes and write the tree as strict JSON, like a checkpoint does."""
    flat = flatten_state(state)
    tensors = {
        name: TensorData(d.dtype, d.shape, memoryview(bytes(d.buffer)))
        for name, d in flat.tensors.items()
    }
    return FlatState(tensors, json.loads(json.dumps(flat.tree, allow_nan=False)))


def _restore(state: dict[str, Any], saved: FlatState, strict: bool = True) -> list[Any]:
    return restore_state(state, saved.tree, saved.tensors.__getitem__, strict=strict)


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


Point = collections.namedtuple("Point", ["x", "y"])


class Counter:
    """A user class with state_dict()/load_state_dict()."""

    def __init__(self, count: int = 0) -> None:
        self.count = count
        self.table = np.zeros(3, dtype=np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "table": self.table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.table = state["table"]


# --- Python values ---------------------------------------------------------------------

FLOATS = [0.1, -0.0, 5e-324, 1.7976931348623157e308, math.inf, -math.inf, math.nan, -math.nan]


def test_python_values_round_trip_with_their_types() -> None:
    payload_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF4000000000123))[0]
    saved = {
        "flag": True,
        "big": 2**100,
        "neg": -7,
        "floats": [*FLOATS, payload_nan],
        "text": "héllo \u2603 \ud800",
        "blob": bytes(range(256)),
        "nothing": None,
        "keys": {0: "int", 1.5: "float", True: "bool", None: "none", "s": "str"},
        "tuple": (1, (2.0, "3")),
        "point": Point(1, 2),
    }
    target = {
        "flag": False,
        "big": 0,
        "neg": 0,
        "floats": [],
        "text": "",
        "blob": b"",
        "nothing": 1,
        "keys": {0: None, 1.5: None, True: None, None: None, "s": None},
        "tuple": (),
        "point": Point(0, 0),
    }
    floats_list = target["floats"]
    assert _restore(target, _save(saved)) == []
    assert target["floats"] is floats_list  # the caller's list object, refilled
    assert [_bits(x) for x in target["floats"]] == [_bits(x) for x in saved["floats"]]
    for key in ("flag", "big", "neg", "text", "blob", "nothing", "tuple"):
        assert target[key] == saved[key] and type(target[key]) is type(saved[key])
    assert list(target["keys"].items()) == list(saved["keys"].items())
    assert [type(k) for k in target["keys"]] == [int, float, bool, type(None), str]
    assert target["point"] == Point(1, 2) and type(target["point"]) is Point


PYTHON_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers() | st.floats(), inner, max_size=4)
    ),
    max_leaves=25,
)


@given(PYTHON_DATA)
def test_any_python_data_round_trips_exactly(value: Any) -> None:
    target: dict[str, Any] = {"v": None}
    _restore(target, _save({"v": value}))
    # the JSON text tells -0.0 from 0.0, 1 from 1.0 and True, and NaN bit patterns apart
    canonical = lambda v: json.dumps(flatten_state({"v": v}).tree)  # noqa: E731
    assert canonical(target["v"]) == canonical(value)


def test_int_keys_of_an_optimizer_state_survive_json() -> None:
    saved = _save({"opt": {"state": {0: {"step": 3}, 1: {"step": 4}}}})
    target: dict[str, Any] = {"opt": {"state": {0: {"step": 0}, 1: {"step": 0}}}}
    _restore(target, saved)
    assert target == {"opt": {"state": {0: {"step": 3}, 1: {"step": 4}}}}


# --- arrays ----------------------------------------------------------------------------


def test_arrays_are_restored_in_place_and_scalars_replaced() -> None:
    state = {
        "np": np.arange(6.0).reshape(2, 3),
        "big_endian": np.arange(3, dtype=">i4"),
        "scalar": np.float32(2.5),
        "torch": torch.arange(4, dtype=torch.int64),
        "param": torch.nn.Parameter(torch.randn(3, 2)),
        "view_target": torch.zeros(2, 3),
        "nested": {"list": [torch.ones(2)], "tuple": (np.ones(2), torch.ones(1))},
        "empty": torch.zeros(0, 5),
        "zero_d": torch.tensor(3.0),
        "bf16": torch.randn(4, dtype=torch.bfloat16),
    }
    saved = _save(state)
    zero_base = torch.zeros(3, 2)
    target = {
        "np": np.zeros((2, 3)),
        "big_endian": np.zeros(3, dtype=">i4"),
        "scalar": np.float32(0),
        "torch": torch.zeros(4, dtype=torch.int64),
        "param": torch.nn.Parameter(torch.zeros(3, 2)),
        "view_target": zero_base.t(),
        "nested": {"list": [torch.zeros(2)], "tuple": (np.zeros(2), torch.zeros(1))},
        "empty": torch.ones(0, 5),
        "zero_d": torch.tensor(0.0),
        "bf16": torch.zeros(4, dtype=torch.bfloat16),
    }
    held = {k: v for k, v in target.items() if k != "scalar"}
    held_items = [target["nested"]["list"][0], *target["nested"]["tuple"]]
    assert _restore(target, saved) == []
    for key, value in held.items():
        assert target[key] is value  # references the user holds stay valid
    assert [target["nested"]["list"][0], *target["nested"]["tuple"]] == held_items
    assert np.array_equal(target["np"], state["np"])
    assert target["big_endian"].tolist() == [0, 1, 2]
    assert type(target["scalar"]) is np.float32 and target["scalar"] == 2.5
    assert torch.equal(target["param"], state["param"]) and target["param"].requires_grad
    assert torch.equal(zero_base.t(), state["view_target"])
    assert torch.equal(target["bf16"], state["bf16"]) and target["zero_d"].item() == 3.0


def test_tensor_names_are_slash_joined_paths() -> None:
    model = torch.nn.Sequential(collections.OrderedDict(fc=torch.nn.Linear(2, 2)))
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    flat = flatten_state({"model": model, "optimizer": opt, "x": [np.ones(1)]})
    assert {"model/fc.weight", "model/fc.bias", "optimizer/state/0/exp_avg", "x/0"} <= set(
        flat.tensors
    )
    assert flat.tree["frameworks"] == ["numpy", "torch"]


def test_contiguous_float32_tensor_is_flattened_without_a_copy() -> None:
    weight = torch.randn(64, 32)
    flat = flatten_state({"w": weight})
    assert np.frombuffer(flat.tensors["w"].buffer, np.uint8).ctypes.data == weight.data_ptr()
    before = weight.clone()
    snapshot = flatten_state({"w": weight}, copy=True)
    weight.add_(1.0)  # the next training step
    assert bytes(snapshot.tensors["w"].buffer) == before.numpy().tobytes()
    assert bytes(flat.tensors["w"].buffer) == weight.numpy().tobytes()


# --- torch training state --------------------------------------------------------------


def _training(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GradScaler on CPU may warn about bf16-less devices
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        "scaler": scaler,
        "epoch": 0,
    }


def _steps(state: dict[str, Any], n: int) -> list[float]:
    gen = torch.Generator().manual_seed(1234 + state["epoch"])
    losses = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=gen)
        loss = (state["model"](x) - x.sum(1, keepdim=True)).pow(2).mean()
        state["optimizer"].zero_grad()
        state["scaler"].scale(loss).backward()
        state["scaler"].step(state["optimizer"])
        state["scaler"].update()
        state["scheduler"].step()
        state["epoch"] += 1
        losses.append(loss.item())
    return losses


def test_adam_scheduler_scaler_resume_bit_identically() -> None:
    uninterrupted = _training(seed=0)
    _steps(uninterrupted, 3)
    saved = _save(uninterrupted)
    scale = uninterrupted["scaler"].get_scale()
    expected = _steps(uninterrupted, 4)

    resumed = _training(seed=99)  # different initial weights
    params = list(resumed["model"].parameters())
    assert _restore(resumed, saved) == []
    assert list(resumed["model"].parameters()) == params
    assert resumed["scheduler"].get_last_lr() == [0.01 * 0.5]
    assert resumed["scaler"].get_scale() == scale and resumed["epoch"] == 3
    assert _steps(resumed, 4) == expected  # exact float equality
    for a, b in zip(resumed["model"].parameters(), uninterrupted["model"].parameters()):
        assert torch.equal(a, b)


def test_user_objects_get_load_state_dict() -> None:
    counter = Counter(5)
    counter.table[:] = [1, 2, 3]
    saved = _save({"counter": counter})
    fresh = Counter()
    _restore({"counter": fresh}, saved)
    assert fresh.count == 5 and fresh.table.tolist() == [1, 2, 3]


# --- errors ----------------------------------------------------------------------------


def test_strict_restore_lists_every_problem_and_changes_nothing() -> None:
    saved = _save(
        {
            "model": torch.nn.Linear(3, 2),
            "w": np.ones((2, 2), np.float32),
            "d": torch.ones(3, dtype=torch.float64),
            "gone": np.ones(1),
            "kept": np.ones(2),
            "items": [torch.ones(1), torch.ones(1)],
        }
    )
    model = torch.nn.Linear(3, 4)
    before = model.weight.detach().clone()
    kept = np.zeros(2)
    state = {
        "model": model,
        "w": np.zeros((2, 3), np.float32),
        "d": torch.zeros(3, dtype=torch.float32),
        "new": np.zeros(1),
        "kept": kept,
        "items": [torch.zeros(1)],
    }
    with pytest.raises(StateMismatchError) as info:
        _restore(state, saved)
    text = str(info.value)
    for expected in [
        "state['model'].state_dict()['weight'] has shape [4, 3], the checkpoint has [2, 3]",
        "state['model'].state_dict()['bias'] has shape [4], the checkpoint has [2]",
        "state['w'] has shape [2, 3], the checkpoint has [2, 2]",
        "state['d'] has dtype F32, the checkpoint has F64",
        "state['new'] is missing from the checkpoint",
        "state['gone'] is in the checkpoint but not in the state",
        "state['items'] has 1 items, the checkpoint has 2",
    ]:
        assert expected in text
    assert len(info.value.problems) == 7
    assert isinstance(info.value, ValueError)
    assert torch.equal(model.weight, before) and kept.tolist() == [0, 0]


def test_non_strict_restores_what_matches_and_reports_the_rest(caplog: Any) -> None:
    saved = _save({"a": np.ones(2), "b": np.ones(3), "extra": 1})
    state = {"a": np.zeros(2), "b": np.zeros(4), "missing": 0}
    with caplog.at_level(logging.WARNING, logger="trainhooks.checkpoint.state.tree"):
        skipped = _restore(state, saved, strict=False)
    assert state["a"].tolist() == [1, 1] and state["b"].tolist() == [0, 0, 0, 0]
    assert sorted(p.path for p in skipped) == ["state['b']", "state['extra']", "state['missing']"]
    assert "Not restored (strict=False): state['b'] has shape [4]" in caplog.text


def test_module_keys_are_checked_and_non_strict_loads_the_rest() -> None:
    source = torch.nn.Linear(2, 2)
    saved = _save({"m": source})
    target = torch.nn.Linear(2, 2, bias=False)
    with pytest.raises(
        StateMismatchError, match=r"\['bias'\] is in the checkpoint but not in the module"
    ):
        _restore({"m": target}, saved)
    skipped = _restore({"m": target}, saved, strict=False)
    assert [p.path for p in skipped] == ["state['m'].state_dict()['bias']"]
    assert torch.equal(target.weight, source.weight)


def test_optimizer_with_other_parameter_groups_is_refused_before_loading() -> None:
    model = torch.nn.Linear(2, 2)
    saved = _save({"opt": torch.optim.SGD(model.parameters(), lr=0.1)})
    other = torch.optim.SGD([model.weight], lr=0.5)
    with pytest.raises(
        StateMismatchError, match=r"parameter groups of sizes \[1\], the checkpoint \[2\]"
    ):
        _restore({"opt": other}, saved)
    assert other.param_groups[0]["lr"] == 0.5


def test_read_only_target_and_missing_tensor_data_are_reported() -> None:
    saved = _save({"a": np.ones(2), "b": np.ones(2)})
    del saved.tensors["b"]
    ro = np.zeros(2)
    ro.flags.writeable = False
    with pytest.raises(StateMismatchError) as info:
        _restore({"a": ro, "b": np.zeros(2)}, saved)
    assert "state['a'] is a read-only NumPy array" in str(info.value)
    assert "state['b'] is saved as tensor 'b', which the checkpoint's data lacks" in str(info.value)


def test_kind_mismatches_are_reported() -> None:
    saved = _save({"a": np.ones(2), "b": 1.0, "c": {"x": 1}, "m": Counter()})
    with pytest.raises(StateMismatchError) as info:
        _restore({"a": 1.0, "b": np.zeros(2), "c": [1], "m": {"count": 1}}, saved)
    text = str(info.value)
    assert "state['a'] is a Python float, the checkpoint has an array (F64, shape [2])" in text
    assert "state['b'] is an array, the checkpoint has a Python float" in text
    assert "state['c'] is a list, the checkpoint has a dict" in text
    assert "state['m'] is a dict, the checkpoint has the state of a " in text


class Foo:
    pass


@pytest.mark.parametrize("check", [check_state, flatten_state])
def test_unsupported_values_are_refused_naming_their_path(check: Any) -> None:
    with pytest.raises(
        TypeError, match=r"^state\['model'\]\['fc'\] has unsupported type Foo: pass"
    ):
        check({"model": {"fc": Foo()}})
    with pytest.raises(TypeError, match=r"state\['x'\]\[1\] has unsupported type set"):
        check({"x": [1, {2}]})
    with pytest.raises(TypeError, match=r"state\['d'\] has a key of unsupported type tuple"):
        check({"d": {(1, 2): 3}})
    with pytest.raises(TypeError, match=r"state\['t'\] a tensor with layout torch.sparse_coo"):
        check({"t": torch.eye(2).to_sparse()})
    with pytest.raises(
        TypeError, match=r"state\['c'\].state_dict\(\)\['table'\] NumPy dtype object"
    ):
        counter = Counter()
        counter.table = np.array([None])
        check({"c": counter})


@pytest.mark.parametrize("check", [check_state, flatten_state])
def test_reserved_and_colliding_names_are_refused(check: Any) -> None:
    with pytest.raises(ValueError, match="'global_step' is reserved"):
        check({"global_step": 3})
    with pytest.raises(ValueError, match=r"would both be saved as tensor 'a/b'"):
        check({"a/b": np.ones(1), "a": {"b": np.ones(1)}})


def test_check_state_accepts_a_training_state_and_flattens_nothing() -> None:
    state = _training(seed=0)
    state["rows"] = [np.ones(2), {"k": (1, b"x", None)}]
    assert check_state(state) is None
    assert flatten_state(state).tensors  # the same state flattens


def test_unknown_tree_version_is_refused() -> None:
    with pytest.raises(ValueError, match="Unsupported state tree"):
        restore_state({}, {"version": 99, "root": {}}, lambda name: None)  # type: ignore[arg-type,return-value]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_round_trip_through_host_memory() -> None:
    source = torch.randn(5, 3, device="cuda")
    opt_model = torch.nn.Linear(3, 3).cuda()
    saved = _save({"t": source, "m": opt_model})
    target = torch.zeros(5, 3, device="cuda")
    model = torch.nn.Linear(3, 3).cuda()
    _restore({"t": target, "m": model}, saved)
    assert target.device.type == "cuda" and torch.equal(target, source)
    assert torch.equal(model.weight, opt_model.weight)


def test_jax_arrays_are_replaced_in_their_container() -> None:
    jnp = pytest.importorskip("jax.numpy")
    saved = _save({"params": {"w": jnp.arange(4.0)}, "l": [jnp.ones(2)]})
    state = {"params": {"w": jnp.zeros(4)}, "l": [jnp.zeros(2)]}
    params, items = state["params"], state["l"]
    _restore(state, saved)
    assert state["params"] is params and state["l"] is items
    assert state["params"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert state["l"][0].tolist() == [1.0, 1.0]
