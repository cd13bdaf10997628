"""examples/ddp_torchrun.py runs as its docstring says: under torchrun, twice, resuming."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.paths import ROOT, SRC

import trainhooks as th

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # two torchrun jobs of two processes


def torchrun(directory: Path, steps: int) -> str:
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "examples" / "ddp_torchrun.py"),
            "--dir",
            str(directory),
            "--steps",
            str(steps),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_the_torchrun_example_saves_with_both_ranks_and_resumes(tmp_path: Path) -> None:
    first = torchrun(tmp_path, 10)
    assert "step 10:" in first
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-10")
    second = torchrun(tmp_path, 15)
    assert "[rank 0] Restoring parameters from" in second
    assert "[rank 1] Restoring parameters from" in second
    assert "step 15:" in second
    state = th.get_checkpoint_state(str(tmp_path))
    assert state is not None
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        "model.ckpt-0",
        "model.ckpt-5",
        "model.ckpt-10",
        "model.ckpt-15",
    ]
