"""The on-disk format: round trips, multi-file states, safetensors interop, write-time errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from tests.helpers.checkpoints import CODES, Flat, td

from trainhooks.checkpoint.format.opening import MANIFEST_NAME, open_checkpoint
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.storage.commit import is_checkpoint
from trainhooks.errors import NotFoundError

TORCH_CODES = {
    torch.bfloat16: "BF16",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
}


def torch_td(t: torch.Tensor) -> TensorData:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return TensorData(TORCH_CODES[t.dtype], tuple(t.shape), memoryview(raw))


def as_array(data: TensorData) -> np.ndarray:
    dtype = next(d for d, c in CODES.items() if c == data.dtype)
    return np.frombuffer(data.buffer, dtype=dtype).reshape(data.shape)


def sample_arrays(rng: np.random.Generator) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for dtype in CODES:
        for shape in [(), (0,), (3, 0, 2), (7,), (2, 3, 4)]:
            a = np.asarray(rng.standard_normal(shape) * 100).astype(dtype)
            if dtype == np.complex64:
                a = a + 1j * a[::-1] if a.ndim else a
            arrays[f"{CODES[dtype]}/{'x'.join(map(str, shape)) or 'scalar'}"] = a
    return arrays


def test_round_trip_every_numpy_dtype_and_shape(tmp_path: Path) -> None:
    arrays = sample_arrays(np.random.default_rng(0))
    prefix = tmp_path / "model.ckpt-3"
    tree = {"nested": [1, "two", None, 3.5], "names": sorted(arrays)}
    write_checkpoint(
        prefix,
        Flat({k: td(v) for k, v in arrays.items()}, tree),
        global_step=3,
        metadata={"run": "abc", "lr": 0.1},
    )
    assert is_checkpoint(prefix)
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()
        assert ckpt.global_step == 3
        assert ckpt.tree == tree
        assert ckpt.metadata == {"run": "abc", "lr": 0.1}
        assert ckpt.names == sorted([*arrays, "global_step"])
        for name, a in arrays.items():
            data = ckpt.tensor_data(name)
            assert (data.dtype, data.shape) == (CODES[a.dtype], a.shape)
            np.testing.assert_array_equal(as_array(data), a)
            assert data.buffer.readonly


def test_extension_dtypes_round_trip_bit_exact(tmp_path: Path) -> None:
    x = torch.randn(5, 3)
    tensors = {f"t/{code}": x.to(dtype) for dtype, code in TORCH_CODES.items()}
    write_checkpoint(
        tmp_path / "m-1", Flat({k: torch_td(v) for k, v in tensors.items()}, None), global_step=1
    )
    with open_checkpoint(tmp_path / "m-1") as ckpt:
        for name, t in tensors.items():
            assert bytes(ckpt.tensor_data(name).buffer) == t.view(torch.uint8).numpy().tobytes()


@settings(max_examples=25, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: s not in ("global_step", "__metadata__")),
        st.tuples(
            st.sampled_from(sorted(CODES, key=str)),
            st.lists(st.integers(0, 5), max_size=4),
        ),
        max_size=12,
    ),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(16, 4096),
)
def test_any_names_shapes_and_split_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    specs: dict[str, tuple[np.dtype, list[int]]],
    step: int,
    max_shard_bytes: int,
) -> None:
    rng = np.random.default_rng(1)
    arrays = {
        name: rng.integers(0, 255, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        .view(dtype)
        .reshape(shape)
        for name, (dtype, shape) in specs.items()
    }
    prefix = tmp_path_factory.mktemp("ckpt") / "m"
    flat = Flat({k: td(v) for k, v in arrays.items()}, {"k": list(arrays)})
    write_checkpoint(prefix, flat, global_step=step, max_shard_bytes=max_shard_bytes)
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()
        assert ckpt.global_step == step
        for name, a in arrays.items():
            assert bytes(ckpt.tensor_data(name).buffer) == a.tobytes()


def test_large_state_is_split_into_balanced_files_written_in_parallel(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    arrays = {
        f"layer{i}/w": rng.standard_normal(1000 + 97 * i).astype(np.float32) for i in range(40)
    }
    prefix = tmp_path / "m-5"
    write_checkpoint(
        prefix,
        Flat({k: td(v) for k, v in arrays.items()}, None),
        global_step=5,
        max_shard_bytes=64_000,
        num_threads=4,
    )
    files = sorted(f for f in os.listdir(prefix) if f.endswith(".safetensors"))
    total = sum(a.nbytes for a in arrays.values())
    count = len(files)
    assert count == -(-total // 64_000)
    assert files == [f"data-{i:05d}-of-{count:05d}.safetensors" for i in range(count)]
    sizes = [os.path.getsize(prefix / f) for f in files]
    assert max(sizes) - min(sizes) < 12_000  # balanced to within about one tensor
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify(num_threads=3)
        for name, a in arrays.items():
            np.testing.assert_array_equal(as_array(ckpt.tensor_data(name)), a)


def test_data_files_are_standard_safetensors_files(tmp_path: Path) -> None:
    arrays = sample_arrays(np.random.default_rng(3))
    extension = {"bf16": torch.randn(4, 4).to(torch.bfloat16)}
    tensors = {k: td(v) for k, v in arrays.items()} | {k: torch_td(v) for k, v in extension.items()}
    prefix = tmp_path / "m-7"
    write_checkpoint(prefix, Flat(tensors, None), global_step=7, max_shard_bytes=300)
    seen: dict[str, Any] = {}
    files = [f for f in sorted(os.listdir(prefix)) if f.endswith(".safetensors")]
    assert len(files) > 1
    for file in files:
        path = str(prefix / file)
        raw = (prefix / file).read_bytes()
        assert (8 + int.from_bytes(raw[:8], "little")) % 8 == 0  # data start aligned
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                seen[name] = f.get_tensor(name)
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118
                if name in arrays:
                    np.testing.assert_array_equal(f.get_tensor(name), arrays[name])
    assert set(seen) == {*arrays, *extension, "global_step"}
    assert seen["global_step"].item() == 7 and seen["global_step"].dtype == torch.int64
    assert torch.equal(seen["bf16"], extension["bf16"])
    for name, a in arrays.items():
        if a.dtype not in (np.uint16, np.uint32, np.uint64):  # torch lacks full unsigned support
            np.testing.assert_array_equal(seen[name].numpy(), a)


def test_tensors_are_aligned_to_their_item_size(tmp_path: Path) -> None:
    arrays = {
        "a": np.ones(3, np.int8),
        "b": np.ones(3, np.float64),
        "c": np.ones(1, np.int16),
        "d": np.ones(5, np.float32),
    }
    write_checkpoint(
        tmp_path / "m", Flat({k: td(v) for k, v in arrays.items()}, None), global_step=0
    )
    manifest = json.loads((tmp_path / "m" / MANIFEST_NAME).read_text())
    for file in manifest["files"].values():  # tensors lie back to back from data_start
        start = file["data_start"]
        for dtype, shape in zip(file["dtypes"], file["shapes"]):
            assert start % DTYPE_ITEMSIZE[dtype] == 0
            start += DTYPE_ITEMSIZE[dtype] * math.prod(shape)


def test_manifest_records_what_the_issue_lists(tmp_path: Path, clock: Any) -> None:
    write_checkpoint(
        tmp_path / "m-9",
        Flat({"w": td(np.zeros(2, np.float32))}, ["w"]),
        global_step=9,
        clock=clock,
    )
    manifest = json.loads((tmp_path / "m-9" / MANIFEST_NAME).read_text())
    assert manifest["format"] == "trainhooks.checkpoint" and manifest["version"] == 1
    assert manifest["global_step"] == 9 and manifest["wall_time"] == clock.now
    assert manifest["checksum_algorithm"] == "xxh3_128"
    [(file, columns)] = manifest["files"].items()
    at = columns["tensors"].index("w")
    dtype, shape = columns["dtypes"][at], columns["shapes"][at]
    assert (dtype, shape) == ("F32", [2])
    assert all(len(checksum) == 32 for _, checksum in columns["checksums"])
    assert columns["size"] == os.path.getsize(tmp_path / "m-9" / file)
    assert manifest["manifest_checksum"]


def test_write_refuses_bad_input_before_touching_disk(tmp_path: Path) -> None:
    good = td(np.zeros(2, np.float32))
    cases: list[tuple[Flat, dict[str, Any], type[Exception], str]] = [
        (Flat({"global_step": good}, None), {}, ValueError, "reserved"),
        (Flat({"__metadata__": good}, None), {}, ValueError, "reserved by safetensors"),
        (Flat({"w": TensorData("F32", (3,), good.buffer)}, None), {}, ValueError, "'w'.*8.*12"),
        (Flat({"w": TensorData("F99", (2,), good.buffer)}, None), {}, ValueError, "F99"),
        (Flat({"w": good}, {"x": object()}), {}, ValueError, "tree"),
        (Flat({"w": good}, None), {"metadata": {"x": {1, 2}}}, ValueError, "metadata"),
    ]
    for flat, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            write_checkpoint(tmp_path / "m", flat, global_step=0, **kwargs)
    with pytest.raises(TypeError, match="global_step"):
        write_checkpoint(tmp_path / "m", Flat({}, None), global_step=1.5)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="Parent directory"):
        write_checkpoint(tmp_path / "nope" / "m", Flat({}, None), global_step=0)
    (tmp_path / "file").write_text("user data")
    with pytest.raises(FileExistsError, match="not a trainhooks checkpoint"):
        write_checkpoint(tmp_path / "file", Flat({}, None), global_step=0)
    assert (tmp_path / "file").read_text() == "user data"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_empty_state_still_stores_the_global_step(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m-0", Flat({}, {}), global_step=0)
    with open_checkpoint(tmp_path / "m-0") as ckpt:
        ckpt.verify()
        assert ckpt.names == ["global_step"] and ckpt.global_step == 0
