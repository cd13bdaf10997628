"""PerRank in one process: rank 0 of a job of one (the job cases are in tests/session/test_jobs.py)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import trainhooks as th


class Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


def test_values_of_every_kind_survive_a_save_and_restore(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    saved = {
        "a": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "t": torch.arange(4, dtype=torch.uint8),
        "big": 2**100 + 7,  # a PCG64 state is a 128-bit integer
        "none": None,
        "nested": {"x": [1.5, "s", True]},
    }
    entry = th.PerRank(Holder(saved))
    sess = th.Session({"per_rank": entry})
    saver = th.Saver()
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=1)
    entry.value.state = {}
    saver.restore(sess, prefix)
    got = entry.value.state
    np.testing.assert_array_equal(got["a"], saved["a"])
    assert got["a"].dtype == np.uint32
    assert torch.equal(torch.as_tensor(got["t"]), saved["t"])
    assert got["big"] == 2**100 + 7 and got["none"] is None
    assert got["nested"]["x"] == [1.5, "s", True]


def test_the_exchange_keeps_every_type_it_carries() -> None:
    torch = pytest.importorskip("torch")
    from trainhooks.checkpoint.per_rank import _decode, _encode

    value = {
        "zero_d": np.array(3.5, dtype=np.float64),
        "scalar": np.float32(1.25),
        "t0": torch.tensor(5),
        "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "tuple": (3, [1, 2], None),
        "int_keys": {0: "a", 1: "b"},
        "tagged_key": {"__tuple__": 1},
        "nan": float("nan"),
        "inf": float("-inf"),
    }
    # Through JSON, as between ranks (json.dumps(allow_nan=False), as the group sends).
    back = _decode(json.loads(json.dumps(_encode(value), allow_nan=False)))
    assert back["zero_d"].shape == () and back["zero_d"].dtype == np.float64
    assert back["zero_d"] == 3.5
    assert type(back["scalar"]) is np.float32 and back["scalar"] == np.float32(1.25)
    assert back["t0"].shape == () and back["t0"].dtype == torch.int64 and int(back["t0"]) == 5
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], value["bf16"])
    assert back["empty"].shape == (0, 3)
    assert back["tuple"] == (3, [1, 2], None)
    assert back["int_keys"] == {0: "a", 1: "b"}
    assert back["tagged_key"] == {"__tuple__": 1}
    assert math.isnan(back["nan"]) and back["inf"] == float("-inf")


def test_python_random_state_restores_through_the_exchange() -> None:
    from trainhooks.checkpoint.per_rank import _decode, _encode

    state = random.getstate()  # a tuple holding a tuple: setstate refuses lists
    a = random.random()
    random.setstate(_decode(json.loads(json.dumps(_encode(state)))))
    assert random.random() == a


def test_rng_state_round_trips_in_one_process() -> None:
    entry = th.PerRank(th.RNGState())
    saved = entry.state_dict()
    a = random.random(), np.random.rand()
    entry.load_state_dict(saved)
    assert (random.random(), np.random.rand()) == a


def test_a_checkpoint_without_this_ranks_values_is_refused_by_name() -> None:
    entry = th.PerRank(th.RNGState())
    with pytest.raises(ValueError, match=r"saved by a job of 0 rank.*nothing for rank 0"):
        entry.load_state_dict({})


def test_bad_values_are_refused_with_what_to_pass() -> None:
    with pytest.raises(TypeError, match="PerRank needs an object with state_dict"):
        th.PerRank(np.zeros(3))
    with pytest.raises(TypeError, match="holds a set"):
        th.PerRank(Holder({"s": {1, 2}})).state_dict()
    with pytest.raises(TypeError, match="array of Python objects"):
        th.PerRank(Holder({"o": np.array([object()])})).state_dict()
