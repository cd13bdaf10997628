"""Reading checkpoints: TF's reader API, laziness, and verification against corrupt or hostile files."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.helpers.checkpoints import Flat, td

from trainhooks.checkpoint.format.manifest import seal_manifest
from trainhooks.checkpoint.format.opening import MANIFEST_NAME, open_checkpoint
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.management.state_file import update_checkpoint_state
from trainhooks.checkpoint.reader import list_variables, load_checkpoint, load_variable
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.errors import DataLossError, NotFoundError

ARRAYS = {
    "model/dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
    "model/dense/bias": np.array([0.5, -1.5, 2.5], dtype=np.float32),
    "optimizer/step": np.array(7, dtype=np.int64),
    "optimizer/empty": np.zeros((0, 2), dtype=np.float16),
}


def save(prefix: Path, step: int = 42, max_shard_bytes: int = 64) -> Path:
    flat = Flat({k: td(v) for k, v in ARRAYS.items()}, {"keys": sorted(ARRAYS)})
    write_checkpoint(prefix, flat, global_step=step, max_shard_bytes=max_shard_bytes)
    return prefix


def checkpoint_files(prefix: Path) -> list[Path]:
    return sorted(prefix.iterdir())


def test_tf_reader_api(tmp_path: Path) -> None:
    prefix = save(tmp_path / "model.ckpt-42")
    with load_checkpoint(prefix) as reader:
        assert reader.global_step == 42
        for name, a in ARRAYS.items():
            value = reader.get_tensor(name)
            assert value.dtype == a.dtype and value.shape == a.shape
            np.testing.assert_array_equal(value, a)
            value[...] = 0  # a new, writable array, like TF's
        np.testing.assert_array_equal(
            reader.get_tensor("model/dense/bias"), ARRAYS["model/dense/bias"]
        )
        assert reader.has_tensor("model/dense/bias") and not reader.has_tensor("model/dense")
        assert reader.get_variable_to_shape_map() == {
            **{k: list(v.shape) for k, v in ARRAYS.items()},
            "global_step": [],
        }
        assert reader.get_variable_to_dtype_map()["model/dense/kernel"] == "F32"
    assert list_variables(prefix) == sorted(
        [(k, list(v.shape)) for k, v in ARRAYS.items()] + [("global_step", [])]
    )
    step = load_variable(prefix, "global_step")
    assert step == 42 and step.dtype == np.int64 and step.shape == ()
    np.testing.assert_array_equal(
        load_variable(prefix, "model/dense/bias:0"), ARRAYS["model/dense/bias"]
    )


def test_a_directory_means_its_latest_checkpoint(tmp_path: Path) -> None:
    for step in (10, 20):
        save(tmp_path / f"model.ckpt-{step}", step=step)
    update_checkpoint_state(str(tmp_path), str(tmp_path / "model.ckpt-20"))
    assert load_variable(tmp_path, "global_step") == 20
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="Couldn't find 'checkpoint' file"):
        load_checkpoint(empty)
    with pytest.raises(NotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "model.ckpt-30")


def test_unknown_names_list_close_ones(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    with pytest.raises(
        NotFoundError, match=r"model/dense/kernal.*Did you mean: model/dense/kernel"
    ):
        load_variable(prefix, "model/dense/kernal")


def test_reading_is_lazy_one_tensor_costs_one_tensor(tmp_path: Path) -> None:
    # Small tensors share a checksum per ~1 MiB (manifest.py): a large one has its own.
    large = np.ones(2**19, np.float32)
    flat = Flat({"large": td(large), **{k: td(v) for k, v in ARRAYS.items()}}, None)
    prefix = tmp_path / "m-1"
    write_checkpoint(prefix, flat, global_step=1)
    [data_file] = [p for p in checkpoint_files(prefix) if p.suffix == ".safetensors"]
    with open_checkpoint(prefix) as ckpt:
        start = ckpt.entry("large").start
    raw = bytearray(data_file.read_bytes())
    raw[start] ^= 0x40
    data_file.write_bytes(raw)
    with load_checkpoint(prefix) as reader:  # opening checks structure, not every byte
        np.testing.assert_array_equal(
            reader.get_tensor("model/dense/bias"), ARRAYS["model/dense/bias"]
        )
        with pytest.raises(DataLossError, match=rf"m-1.*{data_file.name}.*'large'"):
            reader.get_tensor("large")


def _save_bf16(prefix: Path) -> torch.Tensor:
    bf16 = torch.randn(3, 2).to(torch.bfloat16)
    raw = bf16.reshape(-1).view(torch.uint8).numpy()
    write_checkpoint(
        prefix, Flat({"w": TensorData("BF16", (3, 2), memoryview(raw))}, None), global_step=0
    )
    return bf16


def test_dtypes_numpy_lacks_come_back_as_ml_dtypes_arrays(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = _save_bf16(tmp_path / "m")
    value = load_variable(tmp_path / "m", "w")
    assert isinstance(value, np.ndarray) and value.dtype == ml_dtypes.bfloat16
    assert value.tobytes() == bf16.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.slow  # a second process imports torch
def test_without_ml_dtypes_they_come_back_through_torch(tmp_path: Path) -> None:
    bf16 = _save_bf16(tmp_path / "m")
    child = (
        "import sys; sys.modules['ml_dtypes'] = None\n"
        "import torch\n"
        "from trainhooks import load_variable\n"
        "v = load_variable(sys.argv[1], 'w')\n"
        "assert isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16, type(v)\n"
        "print(v.reshape(-1).view(torch.uint8).numpy().tobytes().hex())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "m")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == bf16.reshape(-1).view(torch.uint8).numpy().tobytes().hex()


# --- corruption ------------------------------------------------------------------------


def open_and_verify(prefix: Path) -> None:
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()


def test_every_single_bit_flip_is_detected(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    rng = random.Random(0)
    for path in checkpoint_files(prefix):
        original = path.read_bytes()
        # 150 random bytes of every file (manifest, headers, tensor data), one random bit each
        for offset in rng.sample(range(len(original)), min(150, len(original))):
            corrupt = bytearray(original)
            corrupt[offset] ^= 1 << rng.randrange(8)
            path.write_bytes(corrupt)
            with pytest.raises(DataLossError, match="m-1"):
                open_and_verify(prefix)
        path.write_bytes(original)
    open_and_verify(prefix)


def test_truncation_and_extension_are_detected(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    rng = random.Random(1)
    for path in checkpoint_files(prefix):
        original = path.read_bytes()
        for length in {0, 7, 8, 9, len(original) - 1, *rng.sample(range(len(original)), 60)}:
            path.write_bytes(original[:length])
            with pytest.raises(DataLossError, match=path.name):
                open_and_verify(prefix)
        path.write_bytes(original + b"\0")
        with pytest.raises(DataLossError, match=path.name):
            open_and_verify(prefix)
        path.write_bytes(original)
    open_and_verify(prefix)


def test_missing_files_are_detected(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    for path in checkpoint_files(prefix):
        original = path.read_bytes()
        path.unlink()
        with pytest.raises(DataLossError, match=rf"m-1.*{path.name}.*missing"):
            open_and_verify(prefix)
        path.write_bytes(original)


def forge(prefix: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Rewrite the manifest with ``edit`` applied and a valid checksum: an attacker's file."""
    doc = json.loads((prefix / MANIFEST_NAME).read_text())
    del doc["manifest_checksum"]
    edit(doc)
    text = json.dumps(doc, separators=(",", ":")).encode()
    (prefix / MANIFEST_NAME).write_bytes(seal_manifest(text))


def first_file(doc: dict[str, Any]) -> str:
    return next(iter(doc["files"]))


def rename_file(doc: dict[str, Any], new: str) -> None:
    old = first_file(doc)
    doc["files"] = {(new if k == old else k): v for k, v in doc["files"].items()}


def set_bias(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set the bias's entry in column ``field`` ("dtypes", "shapes") of its file."""

    def edit(doc: dict[str, Any]) -> None:
        columns = doc["files"][first_file(doc)]
        columns[field][columns["tensors"].index("model/dense/bias")] = value

    return edit


def set_file(**fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc["files"][first_file(doc)].update(fields)


def drop(name: str) -> Callable[[dict[str, Any]], None]:
    """Remove tensor ``name`` from its file's columns (its bytes stay)."""

    def edit(doc: dict[str, Any]) -> None:
        columns = doc["files"][first_file(doc)]
        at = columns["tensors"].index(name)
        for field in ("tensors", "dtypes", "shapes"):
            del columns[field][at]

    return edit


HOSTILE: dict[str, Callable[[dict[str, Any]], None]] = {
    "escapes with ..": lambda d: rename_file(d, "../secret"),
    "absolute path": lambda d: rename_file(d, "/etc/passwd"),
    "sub directory": lambda d: rename_file(d, "sub/data.safetensors"),
    "the manifest itself": lambda d: rename_file(d, MANIFEST_NAME),
    "absurd shape": set_bias("shapes", [2**40, 2**40]),
    "zero dim hides absurd one": set_bias("shapes", [0, 2**70]),
    "negative dim": set_bias("shapes", [-3]),
    "data past the end": set_file(data_start=10**12),
    "data in the header": set_file(data_start=12),
    "data start as float": set_file(data_start=64.0),
    "absurd file size": set_file(size=2**62),
    "unknown dtype": set_bias("dtypes", "F128"),
    "columns of unequal length": lambda d: d["files"][first_file(d)]["dtypes"].append("F32"),
    "entry not a list": set_file(tensors={"model/dense/bias": {"file": 1}}),
    "checksums not covering": lambda d: d["files"][first_file(d)]["checksums"].pop(),
    "newer version": lambda d: d.update(version=99),
    "step mismatch": lambda d: d.update(global_step=43),
    "no global step": drop("global_step"),
    "wrong format": lambda d: d.update(format="orbax"),
    "tensor dropped": drop("model/dense/bias"),
    "bool as int": lambda d: d.update(global_step=True),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_manifests_are_refused(tmp_path: Path, attack: str) -> None:
    prefix = save(tmp_path / "m-1")
    (tmp_path / "secret").write_bytes(b"\0" * 64)
    forge(prefix, HOSTILE[attack])
    with pytest.raises(DataLossError, match="m-1"):
        open_and_verify(prefix)


def test_duplicate_keys_are_refused(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    text = (prefix / MANIFEST_NAME).read_bytes()
    doc = json.loads(text)
    del doc["manifest_checksum"]
    columns = doc["files"][first_file(doc)]
    at = columns["tensors"].index("model/dense/bias")
    for field in ("tensors", "dtypes", "shapes"):  # listed twice, its bytes once
        columns[field].insert(at, columns[field][at])
    columns["checksums"].insert(0, [1, "0" * 32])
    duplicated = json.dumps(doc, separators=(",", ":"))
    (prefix / MANIFEST_NAME).write_bytes(seal_manifest(duplicated.encode()))
    with pytest.raises(DataLossError, match="duplicate tensor name 'model/dense/bias'"):
        open_and_verify(prefix)


def test_symlinked_data_files_are_refused(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    data = next(p for p in checkpoint_files(prefix) if p.suffix == ".safetensors")
    outside = tmp_path / "outside.safetensors"
    data.rename(outside)
    data.symlink_to(outside)
    with pytest.raises(DataLossError, match=rf"{data.name}.*plain file"):
        open_and_verify(prefix)


def test_absurd_header_length_is_refused_before_allocating(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    data = next(p for p in checkpoint_files(prefix) if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[:8] = struct.pack("<Q", 2**62)
    data.write_bytes(raw)
    with pytest.raises(DataLossError, match=rf"{data.name}: header length {2**62} exceeds"):
        open_and_verify(prefix)


def test_a_directory_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    prefix = save(tmp_path / "m-1")
    os.remove(prefix / MANIFEST_NAME)
    with pytest.raises(DataLossError, match=r"manifest manifest\.json is missing"):
        load_checkpoint(prefix)


def test_a_tied_weight_is_read_by_either_name(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from trainhooks.checkpoint.reader import list_variables, load_variable
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.session.session import Session

    embed = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = embed.weight  # tied: one parameter under two names
    model = torch.nn.ModuleDict({"embed": embed, "head": head})
    prefix = Saver().save(Session({"model": model}), str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    names = dict(list_variables(prefix))
    assert names["model/embed.weight"] == names["model/head.weight"] == [5, 3]
    first = load_variable(prefix, "model/embed.weight")
    second = load_variable(prefix, "model/head.weight")
    np.testing.assert_array_equal(first, embed.weight.detach().numpy())
    np.testing.assert_array_equal(second, first)
