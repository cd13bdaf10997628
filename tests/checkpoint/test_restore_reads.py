"""How a restore reads: every run checksummed from the mapped files, then copied in place.

``MappedCheckpoint.verify`` hashes each checksum run straight from the file's mapping
(its pages made resident in 8 MiB steps, ``LocalReadFile.populate``) on a few threads;
only when every run matched are the bytes copied into the user's arrays. These tests
restore into existing arrays of every layout, from files the page cache holds and from
files it does not (written with ``O_DIRECT``, or dropped from it), with many small
tensors and with runs longer than one populate step, and check that a corrupt byte
anywhere leaves the user's state exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.checkpoints import cache, evict, flip_byte_of
from tests.helpers.torch_models import trained_mlp

from trainhooks import errors
from trainhooks.checkpoint.format.manifest import GLOBAL_STEP_NAME
from trainhooks.checkpoint.format.mapped_checkpoint import _POPULATE_STEP
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.state.tree import flatten_state
from trainhooks.checkpoint.storage import LocalStorage
from trainhooks.session.session import Session

torch = pytest.importorskip("torch")


def _layouts(rng: np.random.Generator) -> dict[str, Any]:
    """One of each kind of destination a restore writes into."""
    big = rng.standard_normal(_POPULATE_STEP // 4 + 1001).astype(np.float32)  # > one step
    return {
        "contiguous": rng.standard_normal((64, 33)).astype(np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((7, 5))),
        "strided": rng.standard_normal((12, 6))[::2, ::3].copy()[:, :],
        "big_endian": rng.standard_normal(17).astype(">f8"),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4), np.int16),
        "big": big,
        "ints": rng.integers(-(2**40), 2**40, 1000),
        "bools": rng.random(77) > 0.5,
        "torch": {
            "contiguous": torch.randn(8, 9),
            "transposed": torch.randn(9, 8).t(),
            "bf16": torch.randn(31).to(torch.bfloat16),
            "param": torch.nn.Parameter(torch.randn(5, 5)),
        },
        "small": {f"t{i:04d}": rng.standard_normal(256).astype(np.float32) for i in range(3000)},
    }


def _leaves(state: Any, path: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for k, v in state.items():
            out.update(_leaves(v, f"{path}/{k}"))
        return out
    return {path: state}


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        return bytes(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return bytes(np.ascontiguousarray(value).tobytes())


def _zero(state: Any) -> None:
    for leaf in _leaves(state).values():
        if isinstance(leaf, torch.Tensor):
            with torch.no_grad():
                leaf.zero_()
        else:
            leaf[...] = 0


def _snapshot(state: Any) -> dict[str, bytes]:
    return {k: _as_bytes(v) for k, v in _leaves(state).items()}


def _non_contiguous(state: dict[str, Any]) -> None:
    """Make "strided" a real strided view of a larger array (not a copy)."""
    base = np.zeros((12, 6))
    base[::2, ::3] = state["strided"]
    state["strided"] = base[::2, ::3]
    assert not state["strided"].flags.c_contiguous


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "dropped from the cache"])
def test_restore_into_existing_arrays_of_every_layout(tmp_path: Path, cached: bool) -> None:
    rng = np.random.default_rng(0)
    state = _layouts(rng)
    _non_contiguous(state)
    saved = _snapshot(state)
    prefix = Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=3)
    assert prefix is not None
    objects = _leaves(state)
    _zero(state)
    if cached:
        cache(prefix)
    else:
        evict(prefix)
    Saver().restore(Session(state), prefix)
    assert _snapshot(state) == saved
    for key, value in _leaves(state).items():
        assert value is objects[key], f"{key} was replaced, not restored in place"


def test_several_data_files_read_side_by_side(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    state = {f"w{i}": rng.standard_normal(40_000).astype(np.float32) for i in range(12)}
    prefix = str(tmp_path / "ckpt-1")
    write_checkpoint(prefix, flatten_state(state), global_step=1, max_shard_bytes=200_000)
    with open_checkpoint(prefix) as ckpt:
        assert len(ckpt.manifest.files) > 3
        for threads in (1, 2, 8):
            ckpt._verified.clear()
            ckpt._all_verified = False
            ckpt.verify(num_threads=threads)
            for name, value in state.items():
                assert bytes(ckpt.tensor_data(name).buffer) == value.tobytes()


def test_every_data_file_is_prefetched_before_any_header_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold open asks for all files' headers at once, not one header fault at a time."""
    from trainhooks.checkpoint.format import opening
    from trainhooks.checkpoint.storage import local

    rng = np.random.default_rng(1)
    state = {f"w{i}": rng.standard_normal(40_000).astype(np.float32) for i in range(12)}
    prefix = str(tmp_path / "ckpt-1")
    write_checkpoint(prefix, flatten_state(state), global_step=1, max_shard_bytes=200_000)
    evict(prefix)
    events: list[tuple[str, str]] = []
    lengths: list[int] = []
    prefetch, verify_header = local.LocalReadFile.prefetch, opening.verify_header

    def spy_prefetch(self: Any, start: int, length: int) -> None:
        events.append(("prefetch", os.path.basename(self.path)))
        lengths.append(length)
        prefetch(self, start, length)

    def spy_header(data: Any, size: int, entry: Any, fail: Any) -> None:
        events.append(("header", ""))
        verify_header(data, size, entry, fail)

    monkeypatch.setattr(local.LocalReadFile, "prefetch", spy_prefetch)
    monkeypatch.setattr(opening, "verify_header", spy_header)
    with open_checkpoint(prefix) as ckpt:
        files = set(ckpt.manifest.files)
        ckpt.verify()
        for name, value in state.items():
            assert bytes(ckpt.tensor_data(name).buffer) == value.tobytes()
    assert len(files) > 3
    first_header = events.index(("header", ""))
    assert {name for _, name in events[:first_header]} == files
    assert [kind for kind, _ in events[first_header:]] == ["header"] * len(files)
    with open_checkpoint(prefix) as ckpt:  # just the headers: the data is read when restored
        headers = [ckpt.manifest.files[name].data_start for _, name in events[:first_header]]
    assert lengths[: len(headers)] == headers


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
def test_a_missing_data_file_closes_the_files_opened_before_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    state = {f"w{i}": rng.standard_normal(40_000).astype(np.float32) for i in range(12)}
    prefix = str(tmp_path / "ckpt-1")
    write_checkpoint(prefix, flatten_state(state), global_step=1, max_shard_bytes=200_000)
    files = sorted(f for f in os.listdir(prefix) if f.startswith("data-"))
    assert len(files) > 3
    os.unlink(os.path.join(prefix, files[2]))  # the files before it are opened first
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(errors.DataLossError, match=f"{files[2]} is missing"):
        open_checkpoint(prefix)
    assert len(os.listdir("/proc/self/fd")) == before


def test_prefetch_is_a_hint_on_every_range(tmp_path: Path) -> None:
    raw = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(raw)
    handle = LocalStorage().open_read(str(tmp_path / "f"))
    for start, length in [(0, len(raw)), (3, 10_000), (len(raw) - 1, 1), (17, 0), (5, 2**40)]:
        handle.prefetch(start, length)
    assert bytes(handle.view()) == raw
    handle.close()
    handle.prefetch(0, 10)  # closed: nothing to do


def test_a_file_written_with_o_direct_restores_from_the_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    state = {"w": rng.standard_normal(6 * 2**20 // 8)}  # 6 MiB: written with O_DIRECT
    expected = state["w"].copy()
    prefix = str(tmp_path / "ckpt-5")
    write_checkpoint(
        prefix, flatten_state(state), global_step=5, storage=LocalStorage(direct_io=True)
    )
    target = {"w": np.zeros_like(expected)}
    Saver().restore(Session(target), prefix)
    np.testing.assert_array_equal(target["w"], expected)


@pytest.mark.parametrize(
    "tensor", ["big", "contiguous", "small/t1234", "torch/bf16", GLOBAL_STEP_NAME]
)
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "dropped from the cache"])
def test_a_corrupt_byte_leaves_the_state_untouched(
    tmp_path: Path, tensor: str, cached: bool
) -> None:
    rng = np.random.default_rng(3)
    state = _layouts(rng)
    for where in (0.0, 1.0):  # the run's first byte, its last
        directory = tmp_path / str(where)
        directory.mkdir()
        prefix = Saver().save(Session(state), str(directory / "model.ckpt"), global_step=3)
        assert prefix is not None
        flip_byte_of(prefix, tensor, where)
        if cached:
            cache(prefix)
        else:
            evict(prefix)
        target = _layouts(np.random.default_rng(4))  # other values: must stay as they are
        before = _snapshot(target)
        with pytest.raises(errors.DataLossError):
            Saver().restore(Session(target), prefix)
        assert _snapshot(target) == before


def test_many_small_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    state = {
        f"block{i:03d}": {
            f"p{j:02d}": rng.standard_normal(256).astype(np.float32) for j in range(100)
        }
        for i in range(200)
    }
    saved = _snapshot(state)
    prefix = Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    assert prefix is not None
    _zero(state)
    evict(prefix)
    Saver().restore(Session(state), prefix)
    assert _snapshot(state) == saved
    flip_byte_of(prefix, "block123/p45")
    _zero(state)
    with pytest.raises(errors.DataLossError, match=r"block123/p45|tensors checksummed together"):
        Saver().restore(Session(state), prefix)
    assert all(not any(b) for b in _snapshot(state).values())


def test_the_device_copy_reads_the_host_bytes_without_a_host_tensor() -> None:
    """``_device_copy`` (the accelerator path) on CPU tensors: the same bytes arrive."""
    from trainhooks.checkpoint.format.tensor import TensorData
    from trainhooks.checkpoint.state.adapters.torch import _device_copy

    source = torch.randn(6, 4).to(torch.bfloat16)
    raw = source.view(torch.uint8).numpy().tobytes()
    data = TensorData("BF16", (6, 4), memoryview(raw))
    target = torch.zeros(6, 4, dtype=torch.bfloat16)
    assert _device_copy(target, data)
    assert torch.equal(target, source)
    assert not _device_copy(torch.zeros(5, dtype=torch.bfloat16), data)  # wrong size: refused


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch.cuda is not available: no GPU on this machine"
)
def test_cuda_tensors_restore_in_place_from_the_mapping(tmp_path: Path) -> None:
    state = {
        "w": torch.randn(1024, 1024, device="cuda"),
        "b": torch.randn(1024, device="cuda").to(torch.bfloat16),
        "t": torch.randn(64, 32, device="cuda").t(),
        "p": torch.nn.Parameter(torch.randn(33, device="cuda")),
    }
    expected = {k: v.detach().clone() for k, v in state.items()}
    prefix = Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    assert prefix is not None
    objects = dict(state)
    with torch.no_grad():
        for v in state.values():
            v.zero_()
    Saver().restore(Session(state), prefix)
    for k, v in state.items():
        assert v is objects[k] and v.is_cuda
        assert torch.equal(v, expected[k]), k
    assert state["p"].requires_grad
    flip_byte_of(prefix, "w")
    with torch.no_grad():
        state["w"].fill_(7.0)
    with pytest.raises(errors.DataLossError):
        Saver().restore(Session(state), prefix)
    assert bool((state["w"] == 7.0).all())


def test_a_module_and_optimizer_with_large_tensors_restore_exactly(tmp_path: Path) -> None:
    """Their state dicts' large tensors are built on threads (futures, then resolved)."""
    model, opt, params, moments = trained_mlp()
    state = {"model": model, "optimizer": opt}
    prefix = Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    assert prefix is not None
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt.state.clear()
    Saver().restore(Session(state), prefix)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], moments[k]), k
        v["exp_avg"].add_(1.0)  # the optimizer's own, writable memory


@pytest.mark.parametrize("sizes", ["equal", "varied", "with empty"])
@pytest.mark.parametrize("order", ["as saved", "reversed"])
def test_a_batched_run_of_small_arrays_restores_exactly(
    tmp_path: Path, sizes: str, order: str
) -> None:
    rng = np.random.default_rng(6)
    lengths = {
        "equal": [64] * 500,
        "varied": list(rng.integers(1, 300, 500)),
        "with empty": [0, *rng.integers(0, 5, 498), 0],
    }[sizes]
    state = {f"t{i:04d}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(lengths)}
    saved = _snapshot(state)
    prefix = Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    assert prefix is not None
    target = {k: np.full_like(v, 9.0) for k, v in state.items()}
    if order == "reversed":
        target = dict(reversed(list(target.items())))
    Saver().restore(Session(target), prefix)
    assert _snapshot({k: target[k] for k in state}) == saved


def test_populate_is_a_hint_on_every_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainhooks.checkpoint.storage import MemoryStorage, local

    raw = bytes(range(256)) * 5000
    (tmp_path / "f").write_bytes(raw)
    storage = LocalStorage()
    handle = storage.open_read(str(tmp_path / "f"))
    handle.populate(0, 10)  # before view(): nothing mapped yet, nothing done
    view = handle.view()
    for start, length in [(0, len(raw)), (3, 10_000), (len(raw) - 1, 1), (17, 0), (5, 2**40)]:
        handle.populate(start, length)
    assert bytes(view) == raw
    handle.close()
    handle.populate(0, 10)  # closed: nothing to do
    # A kernel without MADV_POPULATE_READ refuses the advice: the file is read by faults.
    monkeypatch.setattr(local, "_MADV_POPULATE_READ", 0x7FFF)
    handle = storage.open_read(str(tmp_path / "f"))
    view = handle.view()
    handle.populate(0, 4096)
    assert bytes(view[:4096]) == raw[:4096]
    handle.close()
    memory = MemoryStorage()
    memory.put("memory://x/f", raw)
    mem_handle = memory.open_read("memory://x/f")
    mem_handle.populate(0, len(raw))
    assert bytes(mem_handle.view()) == raw
