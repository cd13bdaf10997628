"""Restoring DTensors (``saving/sharded_restore.py``) in one process: an FSDP2 model on a
one-rank gloo mesh, made for real.

A fresh optimizer of DTensor parameters is given its moments by a step at learning rate
0 before the restore can fill them; when the restore then fails verification, the
optimizer must be left fresh (no state), not with zero moments and a step count that
would change its next steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import trainhooks as th

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _model_and_optimizer(mesh: Any, seed: int) -> tuple[Any, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _saved(tmp_path: Path, mesh: Any) -> tuple[str, Any, Any]:
    model, optimizer = _model_and_optimizer(mesh, seed=0)
    model(torch.randn(4, 6)).square().mean().backward()
    optimizer.step()
    session = th.Session({"model": model, "optimizer": optimizer})
    (tmp_path / "ckpt").mkdir()
    prefix = th.Saver().save(session, str(tmp_path / "ckpt" / "model.ckpt"), global_step=1)
    assert prefix is not None
    return prefix, model, optimizer


def _flip_a_byte_of_the_shards(prefix: str) -> None:
    (path,) = [os.path.join(prefix, n) for n in os.listdir(prefix) if n.startswith("shards-")]
    with open(path, "r+b") as f:
        f.seek(-8, os.SEEK_END)  # in the data, past the header
        byte = f.read(1)
        f.seek(-8, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def _local(tensor: Any) -> Any:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _locals(model: Any) -> dict[str, Any]:
    return {k: v.to_local().clone() for k, v in model.state_dict().items()}


def test_a_fresh_optimizer_gets_the_saved_moments(tmp_path: Path, mesh: Any) -> None:
    prefix, saved_model, saved_optimizer = _saved(tmp_path, mesh)
    model, optimizer = _model_and_optimizer(mesh, seed=1)
    th.Saver().restore(th.Session({"model": model, "optimizer": optimizer}), prefix)
    for p, q in zip(model.parameters(), saved_model.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
        for key in ("exp_avg", "exp_avg_sq", "step"):
            got, want = optimizer.state[p][key], saved_optimizer.state[q][key]
            assert torch.equal(_local(got), _local(want)), key


def test_a_fresh_optimizer_is_left_fresh_when_the_checkpoint_fails_verification(
    tmp_path: Path, mesh: Any
) -> None:
    prefix, _, _ = _saved(tmp_path, mesh)
    _flip_a_byte_of_the_shards(prefix)
    model, optimizer = _model_and_optimizer(mesh, seed=1)
    before = _locals(model)
    session = th.Session({"model": model, "optimizer": optimizer})

    with pytest.raises(th.errors.DataLossError):
        th.Saver().restore(session, prefix)
    assert len(optimizer.state) == 0
    with pytest.raises(th.errors.DataLossError, match="could be restored"):
        th.Saver().restore_latest(session, str(tmp_path / "ckpt"))
    assert len(optimizer.state) == 0
    assert all(torch.equal(v, before[k]) for k, v in _locals(model).items())
    # and it trains as a fresh one would: its first step is step 1
    model(torch.randn(4, 6)).square().mean().backward()
    optimizer.step()
    assert all(float(s["step"]) == 1.0 for s in optimizer.state.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "complex64", "int64"])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
def test_a_region_goes_into_the_local_tensor_whatever_its_layout_and_dtype(
    tmp_path: Path, mesh: Any, dtype: str, contiguous: bool
) -> None:
    # Contiguous local tensors take the copy straight into their memory; others go
    # through a buffer and copy_: both must put the same values in place.
    from torch.distributed.tensor import DTensor, Replicate

    kind = getattr(torch, dtype)
    saved = (torch.arange(12) - 5).reshape(4, 3).to(kind) * (1 + 1j if kind.is_complex else 1)
    prefix = th.Saver().save(th.Session({"w": saved}), str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    local = torch.zeros(4, 3, dtype=kind) if contiguous else torch.zeros(3, 4, dtype=kind).t()
    target = DTensor.from_local(local, mesh, [Replicate()])
    assert target.to_local().is_contiguous() is contiguous

    th.Saver().restore(th.Session({"w": target}), prefix)

    assert target.to_local().data_ptr() == local.data_ptr()  # in place
    assert torch.equal(target.to_local(), saved)
