"""FSDP2 (``fully_shard`` + AdamW) checkpoints in real gloo jobs, restored onto other meshes.

Each test runs ``tests/_programs/dist_fsdp.py`` once per rank (``helpers/jobs.py``);
every rank reports the full parameters and optimizer moments (``full_tensor()``) as bit
patterns, compared bit for bit across world sizes.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.jobs import run_job
from tests.helpers.paths import PROGRAMS

pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")

PROGRAM = PROGRAMS / "dist_fsdp.py"
pytestmark = pytest.mark.slow


def _job(directory: Path, world: int, *args: str) -> list[dict[str, Any]]:
    results = run_job(PROGRAM, directory, world, *args, timeout=150)
    for r in results:
        assert "full" in r, (
            f"rank {r['rank']}: {r.get('error')}\n{r.get('traceback')}\n{r['stderr']}"
        )
    return results


def _floats(bits: list[int]) -> list[float]:
    return [struct.unpack("<f", struct.pack("<i", b))[0] for b in bits]


def test_fsdp2_saved_at_2_restores_bit_exact_at_3_and_into_a_plain_model(tmp_path: Path) -> None:
    saved = _job(tmp_path, 2, "train", "--steps", "4")
    assert [r["end"] for r in saved] == [4, 4]
    reference = saved[0]["full"]
    assert saved[1]["full"] == reference  # full_tensor() is the same on every rank
    assert any(k.endswith("exp_avg_sq") for k in reference)

    at3 = _job(tmp_path, 3, "restore")
    assert [r["start"] for r in at3] == [4, 4, 4]
    for r in at3:
        assert r["full"] == reference

    plain = _job(tmp_path, 1, "plain")
    assert plain[0]["start"] == 4
    assert plain[0]["full"] == reference


def test_fsdp2_3_to_2_and_training_continues_after_a_resharded_restore(tmp_path: Path) -> None:
    _job(tmp_path, 2, "train", "--steps", "2")
    # restored at 3 (resharded), trained on and saved there
    continued = _job(tmp_path, 3, "train", "--steps", "4")
    assert [r["start"] for r in continued] == [2, 2, 2]
    assert [r["end"] for r in continued] == [4, 4, 4]
    at2 = _job(tmp_path, 2, "restore")
    for r in at2:
        assert r["start"] == 4
        assert r["full"] == continued[0]["full"]
    # The same steps from the same checkpoint in one process: every rank averages the
    # gradients of the same batch, so only rounding differs.
    os.remove(tmp_path / "checkpoint")
    (tmp_path / "model.ckpt-4").rename(tmp_path.parent / f"{tmp_path.name}-step-4")
    plain = _job(tmp_path, 1, "plain", "--steps", "4")
    assert plain[0]["start"] == 2
    for name, bits in continued[0]["full"].items():
        got, want = _floats(plain[0]["full"][name]), _floats(bits)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
        if name.endswith("weight"):
            assert got != _floats(_job_start_bits(tmp_path, name)), "training did not move it"


def _job_start_bits(directory: Path, name: str) -> list[int]:
    import torch

    import trainhooks as th

    with th.load_checkpoint(str(directory / "model.ckpt-2")) as reader:
        tensor = torch.as_tensor(reader.get_tensor(f"model/{name}"))
    return tensor.contiguous().view(torch.int32).reshape(-1).tolist()


def test_a_2d_mesh_writes_each_replicated_box_once_in_background_saves(tmp_path: Path) -> None:
    from safetensors import safe_open

    saved = _job(tmp_path, 2, "train", "--steps", "4", "--mesh2d", "--async-save")
    prefix = tmp_path / "model.ckpt-4"
    shard_files = sorted(prefix.glob("shards-*.safetensors"))
    names: list[str] = []
    for path in shard_files:
        with safe_open(str(path), framework="numpy") as f:
            names.extend(f.keys())
    # 12 DTensors (4 params, 8 moments) each held whole by both ranks: written once each,
    # spread over both ranks' files
    assert len(names) == len(set(names)) == 12
    assert len(shard_files) == 2
    assert "model/0.weight[0:7,0:6]" in names
    plain = _job(tmp_path, 1, "plain")
    assert plain[0]["full"] == saved[0]["full"]


def test_sigkill_of_one_rank_mid_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    import trainhooks as th

    results = run_job(
        PROGRAM,
        tmp_path,
        2,
        "train",
        "--steps",
        "4",
        "--kill-rank",
        "1",
        "--kill-at-save",
        "2",
        timeout=150,
    )
    assert "full" not in results[1]  # killed
    assert "error" in results[0]  # the survivor failed, did not hang
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-2")
    assert not (tmp_path / "model.ckpt-4").exists()
    resumed = _job(tmp_path, 3, "restore")
    assert [r["start"] for r in resumed] == [2, 2, 2]
