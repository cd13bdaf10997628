"""The ``trainhooks`` command on real checkpoint directories, most of it in a real process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import trainhooks as th
from trainhooks import cli
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


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    """``python -m trainhooks.cli ARGS`` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "trainhooks.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
    )


def strict_json(text: str) -> object:
    """``json.loads`` that refuses NaN and Infinity, which are not JSON."""

    def refuse(constant: str) -> object:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def assert_only_own_lines_on_stderr(result: subprocess.CompletedProcess[str], command: str) -> None:
    for line in result.stderr.splitlines():
        assert line.startswith(f"trainhooks {command}: "), line


def flip_last_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


# --- list ------------------------------------------------------------------------------------


def test_list_names_every_listed_checkpoint_with_its_step(ckpt_dir: Path, capsys) -> None:
    assert main(["list", str(ckpt_dir)]) == 0
    captured = capsys.readouterr()
    assert [line.split("\t")[:2] for line in captured.out.splitlines()] == [
        [str(ckpt_dir / "model.ckpt-1"), "step=1"],
        [str(ckpt_dir / "model.ckpt-2"), "step=2"],
    ]
    assert captured.err == ""


def test_list_json(ckpt_dir: Path) -> None:
    result = run_cli("list", "--json", ckpt_dir)
    assert result.returncode == 0, result.stderr
    report = strict_json(result.stdout)
    assert isinstance(report, dict)
    assert [(c["prefix"], c["global_step"], c["status"]) for c in report["checkpoints"]] == [
        (str(ckpt_dir / "model.ckpt-1"), 1, "ok"),
        (str(ckpt_dir / "model.ckpt-2"), 2, "ok"),
    ]
    assert report["problems"] == [] and report["warnings"] == []


def test_missing_directory_is_a_clear_error_with_status_2(tmp_path: Path, capsys) -> None:
    assert main(["list", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "No checkpoint state file" in err and "does not exist" in err


def test_list_on_a_directory_without_checkpoints_exits_1(tmp_path: Path) -> None:
    result = run_cli("list", tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f"no trainhooks checkpoints in {tmp_path}" in result.stderr
    assert_only_own_lines_on_stderr(result, "list")


def test_list_reports_a_listed_checkpoint_that_is_gone(ckpt_dir: Path) -> None:
    for file in (ckpt_dir / "model.ckpt-1").iterdir():
        file.unlink()
    (ckpt_dir / "model.ckpt-1").rmdir()
    result = run_cli("list", ckpt_dir)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{ckpt_dir / 'model.ckpt-1'}\tMISSING: ")
    assert lines[1].startswith(f"{ckpt_dir / 'model.ckpt-2'}\tstep=2")


def test_an_unreadable_state_file_is_reported_on_stderr_never_stdout(ckpt_dir: Path) -> None:
    (ckpt_dir / "checkpoint").write_text("model_checkpoint_path: {not the text format\n")
    result = run_cli("list", ckpt_dir)
    assert result.returncode == 1
    # stdout holds results only: the checkpoints found by listing the directory.
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [
        str(ckpt_dir / "model.ckpt-1"),
        str(ckpt_dir / "model.ckpt-2"),
    ]
    assert_only_own_lines_on_stderr(result, "list")
    assert "trainhooks list: warning: CheckpointStateParseError" in result.stderr
    assert f"the checkpoint state file {ckpt_dir / 'checkpoint'} cannot be read" in result.stderr

    as_json = run_cli("list", "--json", ckpt_dir)
    assert as_json.returncode == 1
    report = strict_json(as_json.stdout)
    assert isinstance(report, dict)
    assert any("CheckpointStateParseError" in w for w in report["warnings"])
    assert any("cannot be read" in p for p in report["problems"])


# --- inspect ---------------------------------------------------------------------------------


def test_inspect_shows_tensors_and_values_of_the_latest_checkpoint(ckpt_dir: Path, capsys) -> None:
    assert main(["inspect", str(ckpt_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{ckpt_dir / 'model.ckpt-2'} (global_step=2)")
    assert "  w\tF32\t[2, 3]" in out
    assert "  lr\tfloat\t0.5" in out


def test_inspect_json_holds_everything_inspect_shows(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "epoch": 4,
        "best": float("nan"),
        "tag": b"\x01\x02",
    }
    saver = th.Saver()
    sess = th.Session(state, global_step=12)
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=sess.global_step)
    saver.close()

    result = run_cli("inspect", "--json", tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = strict_json(result.stdout)
    assert isinstance(report, dict)
    assert report["prefix"] == prefix and report["global_step"] == 12
    tensors = {t["name"]: (t["dtype"], t["shape"]) for t in report["tensors"]}
    assert tensors["model/weight"] == ("BF16", [2, 3])
    assert tensors["global_step"] == ("I64", [])
    values = {v["name"]: (v["type"], v["value"]) for v in report["values"]}
    assert values["epoch"] == ("int", 4)
    assert values["best"] == ("float", "nan")
    assert values["tag"] == ("bytes", "AQI=")
    assert values["scheduler/step_size"] == ("int", 3)
    assert values["optimizer/param_groups"][0] == "list"
    assert values["optimizer/param_groups"][1][0]["momentum"] == 0.9
    assert report["warnings"] == [] and report["problems"] == []

    text = run_cli("inspect", tmp_path)
    assert text.returncode == 0, text.stderr
    assert "  epoch\tint\t4" in text.stdout.splitlines()
    assert "  model/weight\tBF16\t[2, 3]" in text.stdout.splitlines()


def test_inspect_with_an_unreadable_state_file_shows_the_newest_and_exits_1(
    ckpt_dir: Path,
) -> None:
    (ckpt_dir / "checkpoint").write_bytes(b"\xff\xfe not a state file")
    result = run_cli("inspect", ckpt_dir)
    assert result.returncode == 1
    assert result.stdout.startswith(f"{ckpt_dir / 'model.ckpt-2'} (global_step=2)")
    assert "warning" not in result.stdout
    assert_only_own_lines_on_stderr(result, "inspect")
    assert f"trainhooks inspect: warning: {ckpt_dir / 'checkpoint'}: Checkpoint ignored" in (
        result.stderr.splitlines()
    )


def test_a_file_of_a_trainhooks_checkpoint_is_named_as_one(ckpt_dir: Path) -> None:
    prefix = ckpt_dir / "model.ckpt-2"
    data = next(prefix.glob("data-*.safetensors"))
    for path in (prefix / "manifest.json", data):
        result = run_cli("inspect", path)
        assert result.returncode == 2
        assert result.stdout == ""
        assert f"is a file of the trainhooks checkpoint {prefix}: pass {prefix}" in result.stderr
        assert "TensorFlow" not in result.stderr
    state_file = run_cli("inspect", ckpt_dir / "checkpoint")
    assert state_file.returncode == 2
    assert f"is the checkpoint state file of {ckpt_dir}" in state_file.stderr
    assert "TensorFlow" not in state_file.stderr


def test_a_tensorflow_checkpoint_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt-5.index").write_bytes(b"\x00")
    result = run_cli("inspect", tmp_path / "model.ckpt-5")
    assert result.returncode == 2
    assert "is a TensorFlow checkpoint, not a trainhooks one" in result.stderr


def test_inspect_of_a_damaged_manifest_exits_1(ckpt_dir: Path) -> None:
    flip_last_byte(ckpt_dir / "model.ckpt-2" / "manifest.json")
    result = run_cli("inspect", ckpt_dir / "model.ckpt-2")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"trainhooks inspect: Checkpoint {ckpt_dir / 'model.ckpt-2'}")


# --- verify ----------------------------------------------------------------------------------


def test_verify_reports_a_flipped_bit_and_exits_1(ckpt_dir: Path, capsys) -> None:
    assert main(["verify", str(ckpt_dir)]) == 0
    data = next((ckpt_dir / "model.ckpt-1").glob("data-*.safetensors"))
    flip_last_byte(data)
    assert main(["verify", str(ckpt_dir)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2].startswith(f"DAMAGED {ckpt_dir / 'model.ckpt-1'}")
    assert data.name in out[-2]
    assert out[-1] == f"OK      {ckpt_dir / 'model.ckpt-2'}"


def test_verify_json_in_a_real_process(ckpt_dir: Path) -> None:
    flip_last_byte(next((ckpt_dir / "model.ckpt-2").glob("data-*.safetensors")))
    result = run_cli("verify", "--json", ckpt_dir)
    assert result.returncode == 1
    report = strict_json(result.stdout)
    assert isinstance(report, dict)
    assert [(c["prefix"], c["status"]) for c in report["checkpoints"]] == [
        (str(ckpt_dir / "model.ckpt-1"), "ok"),
        (str(ckpt_dir / "model.ckpt-2"), "damaged"),
    ]
    assert "checksum mismatch" in report["checkpoints"][1]["error"]
    assert result.stderr == ""


def test_verify_checks_checkpoints_the_state_file_does_not_list(ckpt_dir: Path) -> None:
    (ckpt_dir / "checkpoint").unlink()
    result = run_cli("verify", ckpt_dir)
    assert result.returncode == 1  # a directory without its state file is a problem
    assert result.stdout.splitlines() == [
        f"OK      {ckpt_dir / 'model.ckpt-1'}",
        f"OK      {ckpt_dir / 'model.ckpt-2'}",
    ]
    assert f"no checkpoint state file in {ckpt_dir}; found 2 checkpoints" in result.stderr


def test_verify_of_a_path_that_does_not_exist_exits_2(ckpt_dir: Path) -> None:
    result = run_cli("verify", ckpt_dir, ckpt_dir / "nope")
    assert result.returncode == 2
    assert result.stdout == ""  # nothing was verified: every path is checked first
    assert f"{ckpt_dir / 'nope'} does not exist" in result.stderr


# --- the command itself ----------------------------------------------------------------------


def _actions(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.append((action.dest, action))
            for name, sub in action.choices.items():
                found += [(f"{name} {n}", a) for n, a in _actions(sub)]
        elif not isinstance(action, argparse._HelpAction):
            found.append((action.dest, action))
    return found


def test_every_argument_has_help_text() -> None:
    actions = _actions(cli._parser())
    assert {name for name, _ in actions} >= {
        "command",
        "list dir",
        "list json",
        "inspect ckpt",
        "inspect json",
        "verify paths",
        "verify json",
    }
    assert [name for name, action in actions if not (action.help or "").strip()] == []
    result = run_cli("inspect", "--help")
    assert result.returncode == 0
    assert "a trainhooks checkpoint (e.g. ckpt_dir/model.ckpt-200)" in " ".join(
        result.stdout.split()
    )


def test_console_script_runs_in_a_real_process(ckpt_dir: Path) -> None:
    exe = Path(sys.executable).with_name("trainhooks")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainhooks.cli"]
    result = subprocess.run(
        [*cmd, "verify", str(ckpt_dir)], capture_output=True, text=True, env=dict(os.environ)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("OK") == 2
