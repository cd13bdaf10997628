"""A ShardedTensor (FSDP1's sharded state dict) in the state is refused, saying what to
pass instead; made for real on a one-process gloo group."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import trainhooks as th

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed._shard.sharded_tensor")


@pytest.fixture
def sharded_tensor(tmp_path: Path) -> Iterator[Any]:
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import empty
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield empty(ChunkShardingSpec(dim=0, placements=["rank:0/cpu"]), 4, 3)
    finally:
        dist.destroy_process_group()


def _says_what_to_do(e: pytest.ExceptionInfo[Exception]) -> None:
    message = str(e.value)
    assert "'layer'" in message and "is a ShardedTensor (FSDP1's sharded state dict)" in message
    for instead in ("fully_shard", "device_mesh=", "FULL_STATE_DICT", "full_state_dict=True"):
        assert instead in message


def test_saving_a_sharded_tensor_names_what_to_pass_instead(
    tmp_path: Path, sharded_tensor: Any
) -> None:
    session = th.Session({"model": {"layer": sharded_tensor}})
    with pytest.raises(TypeError) as e:
        th.Saver().save(session, str(tmp_path / "model.ckpt"), global_step=1)
    _says_what_to_do(e)
    assert th.latest_checkpoint(str(tmp_path)) is None


def test_restoring_into_a_sharded_tensor_names_what_to_pass_instead(
    tmp_path: Path, sharded_tensor: Any
) -> None:
    saved = th.Saver().save(
        th.Session({"model": {"layer": torch.ones(4, 3)}}), str(tmp_path / "m"), global_step=1
    )
    assert saved is not None
    with pytest.raises(th.errors.StateMismatchError) as e:
        th.Saver().restore(th.Session({"model": {"layer": sharded_tensor}}), saved)
    _says_what_to_do(e)
    assert "nothing was restored" in str(e.value)
