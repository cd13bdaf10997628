"""MonitoredTrainingSession with an FSDP2 model: real gloo jobs, no process group passed.

Each job is ``tests/_programs/dist_fsdp_session.py`` started once per rank: the session
forms the job, saves every step (every rank writing its shards of the parameters and
AdamW moments; the 5 newest kept), stops at ``--steps``. What must hold: a job of 2
stopped and resumed at 2 ends bit-identical to one that ran through; resumed by a job of
3 (resharded) it continues training from the saved step to the same values up to
rounding; checkpoints past ``max_to_keep`` are deleted, shard files and all.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.jobs import run_job
from tests.helpers.paths import PROGRAMS

pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.slow  # several torch processes per test

PROGRAM = PROGRAMS / "dist_fsdp_session.py"


def job(directory: Path, world: int, steps: int) -> list[dict[str, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    results = run_job(PROGRAM, directory, world, "--steps", str(steps), "--save-steps", "1")
    for r in results:
        assert "full" in r, (r.get("error"), r.get("traceback"), r["stderr"])
    return results


def floats(bits: list[int]) -> list[float]:
    return [struct.unpack("<f", struct.pack("<i", b))[0] for b in bits]


def on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in directory.glob("model.ckpt-*"))


def test_an_fsdp2_session_job_resumes_bit_exact_at_2_and_resharded_at_3(tmp_path: Path) -> None:
    through = job(tmp_path / "through", 2, 6)
    assert [(r["start"], r["end"]) for r in through] == [(0, 6), (0, 6)]
    assert through[0]["listed"] == on_disk(tmp_path / "through") == [2, 3, 4, 5, 6]
    assert through[1]["full"] == through[0]["full"]
    assert any(k.endswith("exp_avg_sq") for k in through[0]["full"])

    first = job(tmp_path / "resumed", 2, 4)
    assert [r["end"] for r in first] == [4, 4]
    shutil.copytree(tmp_path / "resumed", tmp_path / "at3", ignore=shutil.ignore_patterns("r*-*"))

    second = job(tmp_path / "resumed", 2, 6)
    assert [(r["start"], r["end"]) for r in second] == [(4, 6), (4, 6)]
    assert second[0]["listed"] == on_disk(tmp_path / "resumed") == [2, 3, 4, 5, 6]
    for r in second:
        assert r["full"] == through[0]["full"]  # bit for bit

    at3 = job(tmp_path / "at3", 3, 6)
    assert [(r["start"], r["end"]) for r in at3] == [(4, 6)] * 3
    assert at3[0]["listed"] == on_disk(tmp_path / "at3") == [2, 3, 4, 5, 6]
    for r in at3[1:]:
        assert r["full"] == at3[0]["full"]
    # Three ranks reduce the same global batch's gradients in another order: the same
    # steps up to rounding, and training moved every weight away from the step-4 values.
    for name, bits in through[0]["full"].items():
        got, want = floats(at3[0]["full"][name]), floats(bits)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), name
        if name.endswith("weight"):
            assert got != floats(first[0]["full"][name]), f"{name} did not change after step 4"
