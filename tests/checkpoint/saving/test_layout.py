"""A saver's ``SaveCache``: what one save derives from the state's structure, reused by the next.

Every test saves with real files. A save that reuses the cache must write what a fresh
saver writes for the same state (data files byte for byte, the same manifest but its
wall time), read back bit for bit, and a state whose structure, dtypes or shapes
changed must be planned anew.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.flat_check import check_flat
from trainhooks.checkpoint.reader import load_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.saving.layout import SaveCache, plan_layout
from trainhooks.checkpoint.state.tree import FlatState
from trainhooks.session.session import Session

N = 300  # past the flatten's bulk size, over several checksum runs and data files
SHARD = 64 * 1024


def make_state(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    model = {f"layer{i:03d}/w": rng.standard_normal(64).astype(np.float32) for i in range(N)}
    model["bias"] = rng.integers(0, 100, (3, 5), dtype=np.int64)
    model["scale"] = np.array(rng.standard_normal(), np.float64)  # 0-d
    return {"model": model, "epoch": 3, "lr": -0.0}


def files_of(prefix: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The data files' bytes, and the manifest without its wall time and checksum."""
    data = {}
    manifest: dict[str, Any] = {}
    for name in sorted(os.listdir(prefix)):
        with open(os.path.join(prefix, name), "rb") as f:
            raw = f.read()
        if name == "manifest.json":
            manifest = json.loads(raw)
            del manifest["wall_time"], manifest["manifest_checksum"]
        else:
            data[name] = raw
    return data, manifest


def fresh_save(state: dict[str, Any], where: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    where.mkdir(exist_ok=True)
    prefix = Saver(max_shard_bytes=SHARD).save(Session(state), str(where / "m"), global_step=1)
    assert prefix is not None
    return files_of(prefix)


def assert_holds(prefix: str, state: dict[str, Any]) -> None:
    reader = load_checkpoint(prefix)
    for key, value in state["model"].items():
        saved = reader.get_tensor(f"model/{key}")
        assert saved.dtype == value.dtype and saved.shape == value.shape, key
        assert saved.tobytes() == np.ascontiguousarray(value).tobytes(), key
    for name in os.listdir(prefix):  # still a file the safetensors library reads
        if name.endswith(".safetensors"):
            safetensors.numpy.load_file(os.path.join(prefix, name))


def change(state: dict[str, Any], how: str) -> None:
    model = state["model"]
    if how == "values in place":
        for value in model.values():
            value[...] = value * 2 + 1
    elif how == "an array replaced":
        model["layer007/w"] = np.full(64, 5, np.float32)
    elif how == "key renamed":
        model["renamed"] = model.pop("layer010/w")
    elif how == "key added":
        model["extra"] = np.ones(2, np.float32)
    elif how == "key dropped":
        del model["layer000/w"]
    elif how == "keys reordered":
        state["model"] = dict(reversed(list(model.items())))
    elif how == "dtype":
        model["layer005/w"] = model["layer005/w"].astype(np.float16)
    elif how == "same-size dtype":
        model["layer005/w"] = model["layer005/w"].view(np.int32)
    elif how == "shape in place":
        model["layer005/w"].shape = (8, 8)
    elif how == "shape":
        model["layer005/w"] = np.zeros(65, np.float32)
    elif how == "python value":
        state["lr"] = 0.0  # -0.0 before: equal, but another value
    elif how == "strided":
        model["layer005/w"] = np.arange(128, dtype=np.float32)[::2]
    else:
        raise AssertionError(how)


HOW = [
    "values in place",
    "an array replaced",
    "key renamed",
    "key added",
    "key dropped",
    "keys reordered",
    "dtype",
    "same-size dtype",
    "shape in place",
    "shape",
    "python value",
    "strided",
]


#: Changes that keep every tensor's name, dtype and shape: the second save reuses the plan.
SAME_TENSORS = {"values in place", "an array replaced", "python value", "strided"}


@pytest.mark.parametrize("how", HOW)
def test_a_second_save_writes_what_a_fresh_saver_writes(how: str, tmp_path: Path) -> None:
    state = make_state()
    session = Session(state)
    saver = Saver(max_shard_bytes=SHARD)
    (tmp_path / "run").mkdir()
    first = saver.save(session, str(tmp_path / "run" / "m"), global_step=1)
    assert first is not None
    kept = saver._cache._last
    change(session.state, how)
    second = saver.save(session, str(tmp_path / "run" / "m"), global_step=2)
    assert second is not None
    assert (saver._cache._last is kept) == (how in SAME_TENSORS)  # reused, or planned anew
    data, manifest = files_of(second)
    assert len(data) > 1  # several data files, each planned
    fresh_data, fresh_manifest = fresh_save(session.state, tmp_path / "fresh")
    assert data == fresh_data
    manifest["global_step"] = fresh_manifest["global_step"]
    assert manifest == fresh_manifest
    assert_holds(second, session.state)
    restored = make_state(seed=1)  # other values, the saved structure
    if how not in ("values in place", "an array replaced"):
        change(restored, how)
    Saver().restore(Session(restored), second)
    for key, value in session.state["model"].items():
        assert restored["model"][key].tobytes() == np.ascontiguousarray(value).tobytes(), key
    assert np.copysign(1, restored["lr"]) == np.copysign(1, session.state["lr"])


def test_many_saves_of_a_changing_state_each_hold_their_values(tmp_path: Path) -> None:
    state = make_state()
    session = Session(state)
    saver = Saver(max_shard_bytes=SHARD, max_to_keep=None)
    expected = {}
    for step in range(1, 6):
        for value in state["model"].values():
            value += step  # in place, between saves
        prefix = saver.save(session, str(tmp_path / "m"), global_step=step)
        assert prefix is not None
        expected[prefix] = {k: v.copy() for k, v in state["model"].items()}
    for prefix, values in expected.items():
        assert_holds(prefix, {"model": values})


def test_the_cache_keeps_one_layout_and_no_array() -> None:
    def columns(shape: tuple[int, ...], dtype: str = "F32") -> TensorColumns:
        return TensorColumns(["w"], [dtype], [shape], [np.zeros(shape, np.float32)])

    cache = SaveCache()
    assert cache.layout(columns((2,)), 1024, 1) is None
    flat = columns((2,))
    cache.keep(plan_layout(flat, check_flat(FlatState(flat, {}), 1), 1024, 1))
    assert cache.layout(columns((2,)), 1024, 1) is not None
    assert cache.layout(columns((3,)), 1024, 1) is None  # a shape
    assert cache.layout(columns((2,), "I32"), 1024, 1) is None  # a dtype
    assert cache.layout(columns((2,)), 2048, 1) is None  # another file size
    assert cache.layout(columns((2,)), 1024, 2) is None  # another world
    layout = cache.layout(columns((2,)), 1024, 1)
    assert not any(isinstance(v, np.ndarray) for v in layout)  # type: ignore[union-attr]
    cache.clear()
    assert cache.layout(columns((2,)), 1024, 1) is None
