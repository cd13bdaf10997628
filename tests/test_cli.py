"""The ``trainhooks`` command on real checkpoint directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import trainhooks as th
from trainhooks.cli import main


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "lr": 0.5}
    sess = th.Session(state)
    saver = th.Saver(max_to_keep=3)
    for step in (1, 2):
        sess.global_step = step
        saver.save(sess, str(tmp_path / "model.ckpt"), global_step=step)
    saver.close()
    return tmp_path


def test_list_names_every_listed_checkpoint_with_its_step(ckpt_dir: Path, capsys) -> None:
    assert main(["list", str(ckpt_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [
        [str(ckpt_dir / "model.ckpt-1"), "step=1"],
        [str(ckpt_dir / "model.ckpt-2"), "step=2"],
    ]


def test_inspect_shows_variables_of_the_latest_checkpoint(ckpt_dir: Path, capsys) -> None:
    assert main(["inspect", str(ckpt_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{ckpt_dir / 'model.ckpt-2'} (global_step=2)")
    assert "  w\tF32\t[2, 3]" in out


def test_verify_reports_a_flipped_bit_and_exits_1(ckpt_dir: Path, capsys) -> None:
    assert main(["verify", str(ckpt_dir)]) == 0
    data = next((ckpt_dir / "model.ckpt-1").glob("data-*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(bytes(raw))
    assert main(["verify", str(ckpt_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith(f"DAMAGED {ckpt_dir / 'model.ckpt-1'}")
    assert data.name in out[-2]
    assert out[-1] == f"OK      {ckpt_dir / 'model.ckpt-2'}"


def test_missing_directory_is_a_clear_error_with_status_2(tmp_path: Path, capsys) -> None:
    assert main(["list", str(tmp_path / "nope")]) == 2
    assert "No checkpoint state file" in capsys.readouterr().err


def test_console_script_runs_in_a_real_process(ckpt_dir: Path) -> None:
    exe = Path(sys.executable).with_name("trainhooks")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainhooks.cli"]
    result = subprocess.run(
        [*cmd, "verify", str(ckpt_dir)], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OK") == 2
