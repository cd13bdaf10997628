"""Sharded tensors in a checkpoint: boxes written, read whole or by region, exported, and
hostile ``sharded`` fields refused before anything is allocated.

The checkpoints here are written in one process from hand-made boxes
(``adapters.dtensor.LocalBoxes``, what a DTensor flattens to), so no process group is
needed; the gloo jobs are ``tests/checkpoint/saving/test_sharded_jobs.py``.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainhooks import errors
from trainhooks.checkpoint.consolidate import consolidate
from trainhooks.checkpoint.format.boxes import Box
from trainhooks.checkpoint.format.manifest import MANIFEST_NAME, seal_manifest
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.format.sharded_read import read_region
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.reader import load_checkpoint, load_variable
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.state.adapters.dtensor import LocalBoxes
from trainhooks.checkpoint.state.tree import FlatState, flatten_state
from trainhooks.cli import main

W = np.arange(20, dtype=np.float32).reshape(5, 4)
B = np.arange(3, dtype=np.int64)


def _boxes(array: np.ndarray[Any, Any], rows: list[int]) -> list[tuple[Box, TensorData]]:
    """``array`` cut into boxes of the given row counts."""
    out, start = [], 0
    for n in rows:
        part = np.ascontiguousarray(array[start : start + n])
        box = Box((start, *([0] * (array.ndim - 1))), part.shape)
        out.append((box, TensorData("F32", part.shape, memoryview(part).cast("B"))))
        start += n
    return out


def _save(prefix: Path, rows: list[int] = [2, 3]) -> Path:  # noqa: B006
    flat = flatten_state({"model": {"w": W, "b": B}})
    tensors: dict[str, Any] = {"model/b": flat.tensors["model/b"]}
    tensors["model/w"] = LocalBoxes("F32", W.shape, _boxes(W, rows), 0, 1)
    write_checkpoint(prefix, FlatState(tensors, flat.tree), global_step=7)  # type: ignore[arg-type]
    return prefix


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return _save(tmp_path / "model.ckpt-7")


def test_a_sharded_tensor_is_stored_as_named_boxes_in_standard_safetensors(ckpt: Path) -> None:
    from safetensors.numpy import load_file

    stored = load_file(str(ckpt / "shards-00000-of-00001.safetensors"))
    assert sorted(stored) == ["model/w[0:2,0:4]", "model/w[2:5,0:4]"]
    np.testing.assert_array_equal(stored["model/w[2:5,0:4]"], W[2:])
    doc = json.loads((ckpt / MANIFEST_NAME).read_bytes())
    assert doc["version"] == 2
    assert doc["sharded"] == {
        "model/w": {"dtype": "F32", "shape": [5, 4], "boxes": [[[0, 0], [2, 4]], [[2, 0], [3, 4]]]}
    }


def test_a_checkpoint_without_sharded_tensors_stays_version_1(tmp_path: Path) -> None:
    prefix = tmp_path / "model.ckpt-1"
    write_checkpoint(prefix, flatten_state({"w": W}), global_step=1)
    doc = json.loads((prefix / MANIFEST_NAME).read_bytes())
    assert doc["version"] == 1 and "sharded" not in doc


def test_readers_see_the_whole_tensor(ckpt: Path) -> None:
    with load_checkpoint(str(ckpt)) as reader:
        assert reader.get_variable_to_shape_map() == {
            "global_step": [],
            "model/b": [3],
            "model/w": [5, 4],
        }
        assert reader.get_variable_to_dtype_map()["model/w"] == "F32"
        assert reader.has_tensor("model/w")
        np.testing.assert_array_equal(reader.get_tensor("model/w"), W)
    np.testing.assert_array_equal(load_variable(str(ckpt), "model/w"), W)


def test_the_plain_weights_function_returns_whole_tensors(ckpt: Path) -> None:
    torch = pytest.importorskip("torch")
    from trainhooks.checkpoint.weights import load_state_dict

    state = load_state_dict(str(ckpt), "model")
    assert torch.equal(state["w"], torch.from_numpy(W))


def test_a_region_reads_only_the_boxes_it_overlaps(tmp_path: Path) -> None:
    # Boxes of 1 MiB and more have a checksum of their own (smaller ones share a run).
    big = np.arange(5 * 2**17, dtype=np.float32).reshape(5, 2**17)
    flat = flatten_state({"w": big})
    tensors = {"w": LocalBoxes("F32", big.shape, _boxes(big, [2, 3]), 0, 1)}
    prefix = tmp_path / "model.ckpt-1"
    write_checkpoint(prefix, FlatState(tensors, flat.tree), global_step=1)  # type: ignore[arg-type]
    # Corrupt the box of rows 2:5; rows 0:2 still read, rows 1:3 do not.
    path = prefix / "shards-00000-of-00001.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with open_checkpoint(str(prefix)) as reader:
        rows = read_region(reader, "w", Box((0, 1), (2, 2)))
        got = np.frombuffer(rows.buffer, np.float32).reshape(2, 2)
        np.testing.assert_array_equal(got, big[0:2, 1:3])
        with pytest.raises(errors.DataLossError, match=r"w\[2:5,0:131072\]"):
            read_region(reader, "w", Box((1, 0), (2, 4)))


def test_consolidate_writes_whole_tensors(ckpt: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    out = tmp_path / "model.safetensors"
    assert sorted(consolidate(str(ckpt), out, entry="model")) == ["b", "w"]
    loaded = load_file(str(out))
    np.testing.assert_array_equal(loaded["w"], W)
    np.testing.assert_array_equal(loaded["b"], B)
    assert main(["consolidate", str(ckpt), str(tmp_path / "all.safetensors")]) == 0
    assert sorted(load_file(str(tmp_path / "all.safetensors"))) == ["model/b", "model/w"]


def test_inspect_shows_the_whole_tensor(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ckpt), "--json"]) == 0
    tensors = json.loads(capsys.readouterr().out)["tensors"]
    assert {"name": "model/w", "dtype": "F32", "shape": [5, 4]} in tensors
    assert not any("[" in t["name"] for t in tensors)


def test_boxes_that_miss_elements_are_never_committed(tmp_path: Path) -> None:
    flat = flatten_state({"model": {"w": W, "b": B}})
    tensors: dict[str, Any] = {"model/b": flat.tensors["model/b"]}
    tensors["model/w"] = LocalBoxes("F32", W.shape, _boxes(W, [2]), 0, 1)  # rows 2:5 missing
    with pytest.raises(ValueError, match="process_group=TorchProcessGroup"):
        write_checkpoint(tmp_path / "model.ckpt-1", FlatState(tensors, flat.tree), global_step=1)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# ---- hostile 'sharded' fields ----------------------------------------------------------------


def _reseal(prefix: Path, change: Any) -> None:
    doc = json.loads((prefix / MANIFEST_NAME).read_bytes())
    del doc["manifest_checksum"]
    change(doc)
    (prefix / MANIFEST_NAME).write_bytes(seal_manifest(json.dumps(doc).encode()))


def _set_boxes(boxes: Any) -> Any:
    def change(doc: dict[str, Any]) -> None:
        doc["sharded"]["model/w"]["boxes"] = boxes

    return change


def _set_shape(shape: Any) -> Any:
    def change(doc: dict[str, Any]) -> None:
        doc["sharded"]["model/w"]["shape"] = shape

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set_boxes([[[0, 0], [2, 4]], [[2, 0], [4, 4]]]), "outside shape"),  # out of bounds
        (_set_boxes([[[0, 0], [3, 4]], [[2, 0], [3, 4]]]), "missing from the data files"),
        (_set_boxes([[[0, 0], [2, 4]], [[0, 0], [2, 4]], [[2, 0], [3, 4]]]), "overlap"),
        (_set_boxes([[[0, 0], [2, 4]]]), "boxes are missing"),
        (_set_boxes([[[0], [2]], [[2, 0], [3, 4]]]), "dimensions"),
        (_set_boxes([[[-1, 0], [2, 4]]]), "not \\[offsets, sizes\\]"),
        (_set_boxes({"a": 1}), "not a list"),
        (_set_shape([2**62, 2**62]), "boxes are missing"),  # absurd: believed only if covered
        (_set_shape([5, 4, 2**70]), "not a list of sizes"),
        (_set_shape([1] * 100), "not a list of sizes"),
        (lambda d: d["sharded"].update({"model/b": d["sharded"]["model/w"]}), "also stored whole"),
        (lambda d: d["sharded"]["model/w"].update(dtype="X9"), "unknown dtype"),
        (lambda d: d["sharded"]["model/w"].update(dtype="I64"), "stored as F32"),
        (lambda d: d["sharded"]["model/w"].pop("boxes"), "expected an object"),
        (lambda d: d.update(version=1), "needs format version 2"),
        (lambda d: d.update(version=3), "newer than this trainhooks reads"),
    ],
)
def test_hostile_sharded_fields_are_refused_before_allocation(
    ckpt: Path, change: Any, message: str
) -> None:
    _reseal(ckpt, change)
    tracemalloc.start()
    try:
        with pytest.raises(errors.DataLossError, match=message):
            open_checkpoint(str(ckpt))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20
