"""TensorFlow's own checkpoint_management reads trainhooks' state files, and vice versa.

Skipped unless TensorFlow is importable (it is not a dependency of trainhooks).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.helpers.checkpoints import array_session

from trainhooks.checkpoint.management.state_file import (
    get_checkpoint_state,
    update_checkpoint_state,
)
from trainhooks.checkpoint.saver import Saver

tf: Any = pytest.importorskip("tensorflow")

# The state of every session here: one float32 array, [0, 1, 2, 3].
W: dict[str, Any] = {"name": "w", "size": 4, "dtype": np.float32}


def test_tf_reads_a_trainhooks_checkpoint_directory(tmp_path: Path) -> None:
    saver = Saver(max_to_keep=2)
    prefixes = [
        saver.save(array_session(0.0, s, **W), str(tmp_path / "model.ckpt"), s)
        for s in (10, 20, 30)
    ]
    ckpt = tf.train.get_checkpoint_state(str(tmp_path))
    assert ckpt.model_checkpoint_path == prefixes[-1]
    assert list(ckpt.all_model_checkpoint_paths) == prefixes[1:]
    assert tf.train.latest_checkpoint(str(tmp_path)) == prefixes[-1]


def test_tf_reads_relative_paths(tmp_path: Path) -> None:
    saver = Saver(save_relative_paths=True)
    for step in (1, 2):
        saver.save(array_session(0.0, step, **W), str(tmp_path / "model.ckpt"), global_step=step)
    expected = [os.path.join(str(tmp_path), f"model.ckpt-{s}") for s in (1, 2)]
    ckpt = tf.train.get_checkpoint_state(str(tmp_path))
    assert list(ckpt.all_model_checkpoint_paths) == expected
    assert tf.train.latest_checkpoint(str(tmp_path)) == expected[-1]


def test_tf_reads_a_cwd_relative_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    Saver().save(array_session(0.0, 5, **W), os.path.join("train", "snapshot"), global_step=5)
    assert tf.train.latest_checkpoint("train") == os.path.join("train", "snapshot-5")


def test_tf_reports_a_missing_checkpoint_like_ours(tmp_path: Path) -> None:
    update_checkpoint_state(str(tmp_path), str(tmp_path / "model.ckpt-7"))
    assert tf.train.latest_checkpoint(str(tmp_path)) is None


@pytest.mark.parametrize(
    "paths",
    [
        ["/abs/run/model.ckpt-1", "/abs/run/model.ckpt-2"],
        ["model.ckpt-1", "model.ckpt-2"],
        ['odd "name"\t\\ ünï', "plain"],
    ],
)
def test_state_file_bytes_match_tensorflow(tmp_path: Path, paths: list[str]) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    timestamps = [1577836800.123456, 1577840400.0]
    update_checkpoint_state(
        str(ours), paths[-1], paths, all_model_checkpoint_timestamps=timestamps,
        last_preserved_timestamp=1577833200.25,
    )  # fmt: skip
    tf.compat.v1.train.update_checkpoint_state(
        str(theirs), paths[-1], paths, all_model_checkpoint_timestamps=timestamps,
        last_preserved_timestamp=1577833200.25,
    )  # fmt: skip
    assert (ours / "checkpoint").read_bytes() == (theirs / "checkpoint").read_bytes()
    for directory in (ours, theirs):  # both readers agree on both files
        mine = get_checkpoint_state(str(directory))
        tf_state = tf.train.get_checkpoint_state(str(directory))
        assert mine is not None
        assert mine.model_checkpoint_path == tf_state.model_checkpoint_path
        assert mine.all_model_checkpoint_paths == list(tf_state.all_model_checkpoint_paths)
        assert mine.all_model_checkpoint_timestamps == list(
            tf_state.all_model_checkpoint_timestamps
        )
        assert mine.last_preserved_timestamp == tf_state.last_preserved_timestamp
