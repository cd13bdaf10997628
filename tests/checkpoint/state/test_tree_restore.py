"""Saving and restoring through real files, the fast NumPy path next to the generic one.

``flatten_state`` keeps plain native-order NumPy arrays as they are and the restore
copies them straight from the mapped file (``tree_restore.Restorer`` with ``locate``,
``host_copies.HostCopies``); every other array (torch tensors, big-endian or otherwise
foreign dtypes, NumPy scalars) goes through its adapter. Both must give back every bit,
in place, into the user's own objects, however the tensors are spread over data files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.state.tree import restore_state
from trainhooks.session.session import Session

MIB = 2**20


def raw(value: Any) -> tuple[str, tuple[int, ...], bytes]:
    """dtype, shape and exact bytes (NaN payloads and -0.0 included) of an array."""
    if isinstance(value, torch.Tensor):
        data = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return str(value.dtype), tuple(value.shape), data
    array = np.asarray(value)
    return array.dtype.str, array.shape, np.ascontiguousarray(array).tobytes()


def leaves(state: Any, path: str = "") -> dict[str, Any]:
    """Every array of a (nested) state by path, NumPy scalars included."""
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for key, value in state.items():
            out.update(leaves(value, f"{path}/{key}"))
        return out
    if isinstance(state, (list, tuple)):
        out = {}
        for i, value in enumerate(state):
            out.update(leaves(value, f"{path}/{i}"))
        return out
    if isinstance(state, (np.ndarray, np.generic, torch.Tensor)):
        return {path: state}
    return {}


def mixed_state(rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
    """A state mixing every kind of array the two paths see; also the base of its views."""
    base = rng.standard_normal((64, 48)).astype(np.float32)
    nan_payload = np.array([0x7FC00123, 0x80000000, 0x7F800000], dtype=np.uint32).view(np.float32)
    state: dict[str, Any] = {
        "small_f32": rng.standard_normal(7).astype(np.float32),
        "strided": base[::3, 5::2],  # a view: restored into the base's memory
        "column": base[:, 3],  # a 1-d strided view
        "fortran": np.asfortranarray(rng.standard_normal((5, 3))),
        "zero_d": np.array(-2.5),
        "zero_d_int": np.array(7, dtype=np.int64),
        "empty": np.zeros((0,), dtype=np.float32),
        "empty_3d": np.zeros((3, 0, 2), dtype=np.int16),
        "bool": rng.random(11) > 0.5,
        "complex64": (rng.standard_normal(6) + 1j * rng.standard_normal(6)).astype(np.complex64),
        "complex128": rng.standard_normal((2, 2)) + 1j * rng.standard_normal((2, 2)),
        "big_endian_i4": np.arange(-3, 9, dtype=">i4"),
        "big_endian_f8": rng.standard_normal(5).astype(">f8"),
        "nan_bits": nan_payload,
        "neg_zero": np.array([-0.0, 0.0], dtype=np.float64),
        "every_int": {
            str(np.dtype(t)): rng.integers(0, 100, 5).astype(t)
            for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64)
        },
        "f16": rng.standard_normal(9).astype(np.float16),
        "numpy_scalar": np.float32(1.25),
        "torch": {
            "w": torch.randn(4, 5),
            "bf16": torch.randn(6).to(torch.bfloat16),
            "i64": torch.arange(-2, 3),
            "strided": torch.randn(6, 4)[:, 1],
        },
        "big_f32": rng.standard_normal(MIB // 4 + 5).astype(np.float32),  # > 1 MiB
        "big_f64": rng.standard_normal(MIB // 8).astype(np.float64),  # exactly 1 MiB
        "layers": [rng.standard_normal(3).astype(np.float32) for _ in range(4)],
        "int_keys": {0: np.ones(2, np.float32), 1: np.full(2, 3, np.int32)},
        "epoch": 3,
    }
    return state, base


def scramble(state: dict[str, Any]) -> None:
    """Overwrite every array in place, so that only a restore can bring the values back."""
    for value in leaves(state).values():
        if isinstance(value, torch.Tensor):
            value.detach().fill_(1)
        elif isinstance(value, np.ndarray):
            value[...] = 1


@pytest.mark.parametrize(
    "max_shard_bytes", [None, 256 * 1024], ids=["one-data-file", "several-data-files"]
)
def test_mixed_state_round_trips_bit_exact_into_the_same_objects(
    tmp_path: Path, max_shard_bytes: int | None
) -> None:
    state, base = mixed_state(np.random.default_rng(0))
    expected = {name: raw(v) for name, v in leaves(state).items()}
    objects = {name: v for name, v in leaves(state).items() if not isinstance(v, np.generic)}
    containers = {"torch": state["torch"], "layers": state["layers"], "int_keys": state["int_keys"]}
    session = Session(state, global_step=41)
    saver = Saver(max_shard_bytes=max_shard_bytes)
    prefix = saver.save(session, str(tmp_path / "model.ckpt"), global_step=41)
    assert prefix is not None
    data_files = [n for n in os.listdir(prefix) if n.endswith(".safetensors")]
    if max_shard_bytes is None:
        assert len(data_files) == 1
    else:
        assert len(data_files) >= 4  # ~3 MiB over files of ~256 KiB

    scramble(state)
    state["numpy_scalar"] = np.float32(0)
    state["epoch"] = 0
    session.global_step = 0
    assert {n: raw(v) for n, v in leaves(state).items()} != expected

    saver.restore(session, prefix)
    saver.close()
    assert session.global_step == 41 and state["epoch"] == 3
    assert {n: raw(v) for n, v in leaves(state).items()} == expected
    for name, value in objects.items():  # every array restored in place
        assert leaves(state)[name] is value, name
    for key, container in containers.items():
        assert state[key] is container, key
    assert np.shares_memory(state["strided"], base) and np.shares_memory(state["column"], base)
    assert raw(base[::3, 5::2]) == expected["/strided"]  # written through the view
    assert type(state["numpy_scalar"]) is np.float32 and state["numpy_scalar"] == 1.25


def test_a_fresh_state_of_new_objects_gets_the_saved_bits(tmp_path: Path) -> None:
    """What a restarted process does: build the state anew, then restore into it."""
    saved, _ = mixed_state(np.random.default_rng(1))
    expected = {name: raw(v) for name, v in leaves(saved).items()}
    prefix = Saver(max_shard_bytes=512 * 1024).save(
        Session(saved, global_step=5), str(tmp_path / "model.ckpt"), global_step=5
    )
    assert prefix is not None
    fresh, base = mixed_state(np.random.default_rng(2))  # same structure, other values
    before = {n: raw(v) for n, v in leaves(fresh).items()}
    assert before != expected
    session = Session(fresh)
    Saver().restore(session, prefix)
    assert {n: raw(v) for n, v in leaves(fresh).items()} == expected
    assert np.shares_memory(fresh["strided"], base)
    assert session.global_step == 5


def test_restoring_from_tensor_data_alone_gives_the_same_bits(tmp_path: Path) -> None:
    """``restore_state`` without ``locate`` (a reader that hands out ``TensorData``, as
    ``load_checkpoint`` users and older callers do) takes the per-tensor path."""
    state, base = mixed_state(np.random.default_rng(4))
    expected = {name: raw(v) for name, v in leaves(state).items()}
    objects = {name: v for name, v in leaves(state).items() if not isinstance(v, np.generic)}
    prefix = Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    assert prefix is not None
    scramble(state)
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()
        assert restore_state(state, ckpt.tree, ckpt.tensor_data) == []
    assert {n: raw(v) for n, v in leaves(state).items()} == expected
    assert all(leaves(state)[n] is v for n, v in objects.items())
    assert np.shares_memory(state["strided"], base)


@pytest.mark.parametrize(
    "make",
    [
        lambda: np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        lambda: np.arange(48, dtype=np.int32).reshape(6, 8)[1::2, ::3],
        lambda: np.zeros((0,), dtype=np.float32),
        lambda: np.zeros((2, 0, 3), dtype=np.int64),
        lambda: np.array(2.5, dtype=np.float32),
    ],
    ids=["fortran", "strided-view", "empty", "empty-3d", "0-d"],
)
def test_awkward_targets_are_restored_in_place_from_tensor_data(tmp_path: Path, make: Any) -> None:
    saved = make()
    prefix = Saver().save(Session({"a": saved}), str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    target = make()
    target[...] = 0
    with open_checkpoint(prefix) as ckpt:
        assert restore_state({"a": target}, ckpt.tree, ckpt.tensor_data) == []
    assert raw(target) == raw(saved)


def test_many_small_arrays_across_many_files_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    dtypes = [np.float32, np.int64, np.uint8, np.bool_, np.float16, np.complex64, np.int16]
    state: dict[str, Any] = {
        f"t{i:04d}": rng.integers(0, 255, rng.integers(0, 40)).astype(dtypes[i % len(dtypes)])
        for i in range(3000)
    }
    state["t0007"] = state["t0007"].reshape(-1, 1)[::2]  # a strided one among them
    expected = {n: raw(v) for n, v in state.items()}
    objects = dict(state)
    session = Session(state, global_step=9)
    prefix = Saver(max_shard_bytes=8 * 1024).save(
        session, str(tmp_path / "model.ckpt"), global_step=9
    )
    assert prefix is not None
    with open_checkpoint(prefix) as ckpt:
        assert len(ckpt.manifest.files) >= 5
        ckpt.verify()
    for value in state.values():
        if value.size:
            value[...] = 0
    Saver().restore(session, prefix)
    assert {n: raw(v) for n, v in state.items()} == expected
    assert all(state[n] is objects[n] for n in state)
