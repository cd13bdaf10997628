"""Plain weights and values from checkpoints the Saver wrote, read back without a session."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from tests.helpers.torch_dtypes import TORCH_DTYPES

import trainhooks as th
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.state.tree import flatten_state
from trainhooks.checkpoint.state.tree_nodes import MalformedTree
from trainhooks.errors import DataLossError, NotFoundError

# Every torch dtype trainhooks stores (the extended codes of format/dtypes.py included).


def raw(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes, so NaN payloads and negative zeros compare exactly."""
    flat = tensor.detach().contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else b""


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A tensor of ``dtype`` whose bytes are random (any NaN payload), bools 0 or 1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).to(torch.bool)
    size = math.prod(shape) * dtype.itemsize
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=gen)
    return data.view(dtype).reshape(shape)


def save(tmp_path: Path, state: dict[str, Any], step: int = 1, **saver_args: Any) -> str:
    saver = th.Saver(**saver_args)
    try:
        prefix = saver.save(th.Session(state), str(tmp_path / "model.ckpt"), global_step=step)
    finally:
        saver.close()
    assert prefix is not None
    return prefix


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental:UserWarning")
def test_every_torch_dtype_comes_back_bit_for_bit(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    saved: dict[str, torch.Tensor] = {}
    for dtype in TORCH_DTYPES:
        name = str(dtype).removeprefix("torch.")
        saved[name] = random_bits(dtype, (3, 4), gen)
        saved[f"{name}.scalar"] = random_bits(dtype, (), gen)
        saved[f"{name}.empty"] = random_bits(dtype, (0, 5), gen)
    prefix = save(tmp_path, {"model": dict(saved)})

    loaded = th.load_state_dict(prefix)

    assert list(loaded) == list(saved)
    for name, tensor in saved.items():
        got = loaded[name]
        assert type(got) is torch.Tensor, name
        assert (got.dtype, got.shape, got.device.type) == (tensor.dtype, tensor.shape, "cpu"), name
        assert raw(got) == raw(tensor), name


def test_a_module_state_dict_loads_into_a_fresh_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    ).to(torch.bfloat16)
    model[1].running_mean.normal_()
    prefix = save(tmp_path, {"model": model, "epoch": 2})

    weights = th.load_state_dict(prefix, "model")

    expected = model.state_dict()
    assert isinstance(weights, OrderedDict)
    assert list(weights) == list(expected)
    for key, tensor in expected.items():
        assert weights[key].dtype == tensor.dtype and raw(weights[key]) == raw(tensor), key
    assert weights._metadata == expected._metadata  # type: ignore[attr-defined]
    fresh = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    ).to(torch.bfloat16)
    fresh.load_state_dict(weights)
    for key, tensor in fresh.state_dict().items():
        assert raw(tensor) == raw(expected[key]), key


def test_tied_weights_come_back_under_both_names(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    torch.manual_seed(0)
    model = Tied()
    prefix = save(tmp_path, {"model": model})

    weights = th.load_state_dict(prefix)

    assert list(weights) == ["embed.weight", "out.weight"]
    assert raw(weights["embed.weight"]) == raw(model.embed.weight)
    assert raw(weights["out.weight"]) == raw(model.embed.weight)
    fresh = Tied()
    fresh.load_state_dict(weights)
    assert torch.equal(fresh.out.weight, model.embed.weight)


def test_numpy_and_ml_dtypes_arrays_come_back_as_torch_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def bits(dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(dtype)
        data = rng.integers(0, 256, math.prod(shape) * dtype.itemsize, dtype=np.uint8)
        return data.view(dtype).reshape(shape)

    arrays: dict[str, Any] = {
        "bf16": bits(ml_dtypes.bfloat16, (2, 3)),
        "f8_e4m3": bits(ml_dtypes.float8_e4m3fn, (5,)),
        "f8_e4m3fnuz": bits(ml_dtypes.float8_e4m3fnuz, (4,)),
        "c128": bits(np.complex128, (3,)),
        "c64": bits(np.complex64, (2, 2)),
        "flags": rng.integers(0, 2, (4,)).astype(bool),
        "zero_d": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), dtype=np.float16),
        "np_scalar": np.float32(1.5),
    }
    expected_dtypes = {
        "bf16": torch.bfloat16,
        "f8_e4m3": torch.float8_e4m3fn,
        "f8_e4m3fnuz": torch.float8_e4m3fnuz,
        "c128": torch.complex128,
        "c64": torch.complex64,
        "flags": torch.bool,
        "zero_d": torch.int64,
        "empty": torch.float16,
        "np_scalar": torch.float32,
    }
    prefix = save(tmp_path, {"params": dict(arrays)})

    loaded = th.load_state_dict(prefix, "params")

    for name, array in arrays.items():
        got = loaded[name]
        assert got.dtype == expected_dtypes[name], name
        assert tuple(got.shape) == np.shape(array), name
        assert raw(got) == np.asarray(array).tobytes(), name
    assert torch.from_numpy(np.asarray(arrays["c128"])).equal(loaded["c128"])


def test_a_numpy_float8_e5m2_array_comes_back_as_torch(tmp_path: Path) -> None:
    array = np.arange(4, dtype=np.uint8).view(ml_dtypes.float8_e5m2)
    prefix = save(tmp_path, {"params": {"a": array}})

    loaded = th.load_state_dict(prefix, "params")

    assert loaded["a"].dtype == torch.float8_e5m2 and raw(loaded["a"]) == array.tobytes()


def test_jax_arrays_come_back_as_torch_tensors(tmp_path: Path) -> None:
    jnp = pytest.importorskip("jax.numpy")
    params = {
        "w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
        "b": jnp.array([1.0, -0.0, float("nan")], dtype=jnp.float32),
    }
    prefix = save(tmp_path, {"params": params})

    loaded = th.load_state_dict(prefix, "params")

    assert loaded["w"].dtype == torch.bfloat16 and loaded["b"].dtype == torch.float32
    assert raw(loaded["w"]) == np.asarray(params["w"]).tobytes()
    assert raw(loaded["b"]) == np.asarray(params["b"]).tobytes()


def test_a_torch_compile_prefix_is_stripped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    compiled = torch.compile(model, backend="eager")  # nothing is compiled until a call
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    prefix = save(tmp_path, {"model": compiled})

    weights = th.load_state_dict(prefix)
    kept = th.load_state_dict(prefix, strip_prefix=None)

    assert list(weights) == list(model.state_dict())
    assert list(kept) == list(compiled.state_dict())
    assert "_orig_mod" not in weights._metadata  # type: ignore[attr-defined]
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    plain.load_state_dict(weights)
    x = torch.randn(2, 3)
    assert torch.equal(plain(x), model(x))


def test_a_distributed_data_parallel_prefix_is_stripped(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = torch.nn.Linear(3, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        assert all(k.startswith("module.") for k in ddp.state_dict())
        prefix = save(tmp_path, {"model": ddp})
    finally:
        dist.destroy_process_group()

    weights = th.load_state_dict(prefix)

    assert list(weights) == ["weight", "bias"]
    plain = torch.nn.Linear(3, 2)
    plain.load_state_dict(weights)
    assert torch.equal(plain.weight, model.weight) and torch.equal(plain.bias, model.bias)
    assert list(th.load_state_dict(prefix, strip_prefix=())) == ["module.weight", "module.bias"]


def test_a_prefix_only_some_keys_have_is_kept(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(2, 2)  # a submodule that happens to be called so
            self.head = torch.nn.Linear(2, 1)

    prefix = save(tmp_path, {"model": Net()})

    assert list(th.load_state_dict(prefix)) == [
        "module.weight",
        "module.bias",
        "head.weight",
        "head.bias",
    ]


def test_optimizer_and_scheduler_state_dicts_with_their_python_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    prefix = save(tmp_path, state, step=3)

    opt_state = th.load_state_dict(prefix, "optimizer")
    sched_state = th.load_state_dict(prefix, "scheduler")

    expected = optimizer.state_dict()
    assert opt_state["param_groups"] == expected["param_groups"]
    assert sorted(opt_state["state"]) == sorted(expected["state"]) == [0, 1]
    for index, slots in expected["state"].items():
        for slot, tensor in slots.items():
            assert raw(opt_state["state"][index][slot]) == raw(tensor), (index, slot)
    assert sched_state == scheduler.state_dict()
    fresh_model = torch.nn.Linear(3, 1)
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=0.5)
    fresh.load_state_dict(opt_state)
    assert fresh.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_load_values_lists_every_python_value_by_name(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5)
    state = {
        "model": model,
        "scheduler": scheduler,
        "epoch": 3,
        "config": {
            "name": "run-1",
            "dropout": 0.25,
            "sizes": (64, 32),
            "best": float("-inf"),
            "blob": b"\x00\xff",
            "resume": None,
            "flags": {1: True, 2: False},
        },
        "w": np.zeros(2),
    }
    prefix = save(tmp_path, state)

    values = th.load_values(prefix)

    sched = {f"scheduler/{k}": v for k, v in scheduler.state_dict().items()}
    for key in ("base_lrs", "_last_lr"):  # lists of Python values: one value each
        assert isinstance(sched[f"scheduler/{key}"], list)
    assert values == {
        **sched,
        "epoch": 3,
        "config/name": "run-1",
        "config/dropout": 0.25,
        "config/sizes": (64, 32),
        "config/best": float("-inf"),
        "config/blob": b"\x00\xff",
        "config/resume": None,
        "config/flags/1": True,
        "config/flags/2": False,
    }
    assert th.load_values(prefix, "config/flags") == {
        "config/flags/1": True,
        "config/flags/2": False,
    }
    assert th.load_values(tmp_path, "epoch") == {"epoch": 3}  # a directory: its latest


def test_an_entry_may_be_a_path_into_the_state(tmp_path: Path) -> None:
    gen, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    prefix = save(
        tmp_path, {"models": {"gen": gen, "disc": disc}, "heads": [torch.nn.Linear(1, 1)]}
    )

    assert list(th.load_state_dict(prefix, "models/disc")) == ["weight", "bias"]
    assert list(th.load_state_dict(prefix, "heads/0")) == ["weight", "bias"]
    everything = th.load_state_dict(prefix, None)
    assert list(everything) == ["models", "heads"]
    assert torch.equal(everything["models"]["gen"]["weight"], gen.weight.detach())


def test_a_directory_means_its_latest_checkpoint(tmp_path: Path) -> None:
    saver = th.Saver()
    sess = th.Session({"model": {"w": torch.zeros(2)}})
    for step in (1, 2):
        sess.state["model"]["w"].fill_(step)
        saver.save(sess, str(tmp_path / "model.ckpt"), global_step=step)
    saver.close()

    assert th.load_state_dict(tmp_path)["w"].tolist() == [2.0, 2.0]
    assert th.load_state_dict(os.fspath(tmp_path / "model.ckpt-1"))["w"].tolist() == [1.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensors_saved_on_a_gpu_come_back_on_the_device_asked_for(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 2).to("cuda", torch.bfloat16)
    prefix = save(tmp_path, {"model": model})

    on_cpu = th.load_state_dict(prefix)
    on_gpu = th.load_state_dict(prefix, device="cuda")

    for key, tensor in model.state_dict().items():
        assert on_cpu[key].device.type == "cpu" and on_gpu[key].device.type == "cuda"
        assert raw(on_cpu[key]) == raw(tensor.cpu()) == raw(on_gpu[key].cpu()), key


def test_errors_say_what_to_pass_instead(tmp_path: Path) -> None:
    prefix = save(tmp_path, {"model": torch.nn.Linear(2, 1), "w": torch.ones(2), "epoch": 1})

    with pytest.raises(NotFoundError, match=r"no state entry 'modle'; its entries are 'model'"):
        th.load_state_dict(prefix, "modle")
    with pytest.raises(TypeError, match=r"'w' .* is a tensor, .*load_variable\(ckpt, 'w'\)"):
        th.load_state_dict(prefix, "w")
    with pytest.raises(TypeError, match=r"'epoch' .* is a Python int, .*load_values"):
        th.load_state_dict(prefix, "epoch")
    with pytest.raises(NotFoundError, match="no state entry 'nope'"):
        th.load_values(prefix, "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="Couldn't find 'checkpoint' file or checkpoints"):
        th.load_state_dict(tmp_path / "empty")
    with pytest.raises(NotFoundError, match="does not exist"):
        th.load_state_dict(tmp_path / "missing")


def test_a_corrupt_tensor_is_refused(tmp_path: Path) -> None:
    w = torch.arange(64, dtype=torch.float32)
    prefix = save(tmp_path, {"model": {"w": w}})
    data = next(Path(prefix).glob("data-*.safetensors"))
    raw_bytes = bytearray(data.read_bytes())
    raw_bytes[raw_bytes.find(raw(w)) + 100] ^= 0x10
    data.write_bytes(bytes(raw_bytes))

    with pytest.raises(DataLossError, match="checksum mismatch"):
        th.load_state_dict(prefix)


def test_a_tree_naming_a_tensor_the_checkpoint_lacks_is_malformed(tmp_path: Path) -> None:
    flat = flatten_state({"model": {"w": np.ones(2, np.float32)}})
    tensors = {"other": flat.tensors["model/w"]}
    write_checkpoint(tmp_path / "m-1", type(flat)(tensors, flat.tree), global_step=1)

    with pytest.raises(MalformedTree, match="names tensor 'model/w', which is not stored"):
        th.load_state_dict(tmp_path / "m-1")
