"""The checkpoint state file: TF's CheckpointStateTest ported, TF-written files, the text format."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainhooks.checkpoint.management.state_file import (
    CheckpointState,
    CheckpointStateParseError,
    checkpoint_exists,
    generate_checkpoint_state_proto,
    get_checkpoint_mtimes,
    get_checkpoint_state,
    latest_checkpoint,
    remove_checkpoint,
    update_checkpoint_state,
)

# ---- CheckpointStateTest (checkpoint_management_test.py) ------------------------------


def test_abs_path(tmp_path: Path) -> None:
    save_dir = str(tmp_path)
    abs_path = os.path.join(save_dir, "model-0")
    ckpt = generate_checkpoint_state_proto(save_dir, abs_path)
    assert ckpt.model_checkpoint_path == abs_path
    assert os.path.isabs(ckpt.model_checkpoint_path)
    assert ckpt.all_model_checkpoint_paths == [abs_path]


def test_rel_path() -> None:
    ckpt = generate_checkpoint_state_proto("train", os.path.join("train", "model-0"))
    assert ckpt.model_checkpoint_path == "model-0"
    assert ckpt.all_model_checkpoint_paths == ["model-0"]


@pytest.mark.parametrize("paths", [None, [], ["model-2"]])
def test_all_model_checkpoint_paths(tmp_path: Path, paths: list[str] | None) -> None:
    abs_path = os.path.join(str(tmp_path), "model-0")
    ckpt = generate_checkpoint_state_proto(
        str(tmp_path), abs_path, all_model_checkpoint_paths=paths
    )
    assert ckpt.model_checkpoint_path == abs_path
    assert len(ckpt.all_model_checkpoint_paths) == (len(paths) + 1 if paths else 1)
    assert ckpt.all_model_checkpoint_paths[-1] == abs_path
    if paths:
        assert paths == ["model-2"]  # the caller's list is not changed


def test_update_checkpoint_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    os.mkdir("train")
    abs_path = os.path.join(str(tmp_path), "model-0")
    rel_path = os.path.join("train", "model-2")
    update_checkpoint_state("train", rel_path, all_model_checkpoint_paths=[abs_path, rel_path])
    assert (tmp_path / "train" / "checkpoint").read_text() == (
        'model_checkpoint_path: "model-2"\n'
        f'all_model_checkpoint_paths: "{abs_path}"\n'
        'all_model_checkpoint_paths: "model-2"\n'
    )
    ckpt = get_checkpoint_state("train")
    assert ckpt is not None
    assert ckpt.model_checkpoint_path == rel_path
    assert ckpt.all_model_checkpoint_paths == [abs_path, rel_path]


def test_update_checkpoint_state_save_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_dir = str(tmp_path)
    monkeypatch.chdir(save_dir)
    abs_path2 = os.path.join(save_dir, "model-2")
    abs_path0 = os.path.join(save_dir, "model-0")
    update_checkpoint_state(
        save_dir, abs_path2, all_model_checkpoint_paths=["model-0", abs_path2],
        save_relative_paths=True,
    )  # fmt: skip
    on_disk = CheckpointState.from_text((tmp_path / "checkpoint").read_bytes())
    assert on_disk.model_checkpoint_path == "model-2"
    assert on_disk.all_model_checkpoint_paths == ["model-0", "model-2"]
    ckpt = get_checkpoint_state(save_dir)
    assert ckpt is not None
    assert ckpt.model_checkpoint_path == abs_path2
    assert ckpt.all_model_checkpoint_paths == [abs_path0, abs_path2]


def test_checkpoint_state_fails_when_incomplete(tmp_path: Path) -> None:
    (tmp_path / "checkpoint").write_text("")
    with pytest.raises(ValueError, match="Invalid checkpoint state loaded from"):
        get_checkpoint_state(str(tmp_path))


def test_checkpoint_completes_relative_paths(tmp_path: Path) -> None:
    save_dir = str(tmp_path)
    (tmp_path / "checkpoint").write_text(
        """
        model_checkpoint_path: "./model.ckpt-687529"
        all_model_checkpoint_paths: "./model.ckpt-687500"
        all_model_checkpoint_paths: "./model.ckpt-687529"
        """
    )
    ckpt = get_checkpoint_state(save_dir)
    assert ckpt is not None
    assert ckpt.model_checkpoint_path == os.path.join(save_dir, "./model.ckpt-687529")
    assert ckpt.all_model_checkpoint_paths == [
        os.path.join(save_dir, "./model.ckpt-687500"),
        os.path.join(save_dir, "./model.ckpt-687529"),
    ]


# ---- the rest of checkpoint_management's edge cases -----------------------------------


def test_no_state_file_gives_none(tmp_path: Path) -> None:
    assert get_checkpoint_state(str(tmp_path)) is None
    assert latest_checkpoint(str(tmp_path)) is None
    assert get_checkpoint_state(str(tmp_path / "does-not-exist")) is None


def test_parse_error_warns_and_gives_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "m-1"\nbogus_field: 3\n')
    with caplog.at_level(logging.WARNING):
        assert get_checkpoint_state(str(tmp_path)) is None
    messages = [r.getMessage() for r in caplog.records]
    assert (
        'CheckpointStateParseError: 2:1 : Message type "tensorflow.CheckpointState" has no '
        'field named "bogus_field".'
    ) in messages
    assert f"{tmp_path / 'checkpoint'}: Checkpoint ignored" in messages


def test_unreadable_state_file_warns_and_gives_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "checkpoint").mkdir()  # a directory where the file should be
    with caplog.at_level(logging.WARNING):
        assert get_checkpoint_state(str(tmp_path)) is None
    assert "Checkpoint ignored" in caplog.text


def test_latest_checkpoint_with_missing_files_logs_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "model.ckpt-5")
    update_checkpoint_state(str(tmp_path), missing)
    with caplog.at_level(logging.ERROR):
        assert latest_checkpoint(str(tmp_path)) is None
    assert f"Couldn't match files for checkpoint {missing}" in caplog.text


def test_custom_latest_filename(tmp_path: Path) -> None:
    prefix = str(tmp_path / "m-1")
    Path(prefix + ".index").write_bytes(b"")
    update_checkpoint_state(str(tmp_path), prefix, latest_filename="latest")
    assert not (tmp_path / "checkpoint").exists()
    assert latest_checkpoint(str(tmp_path)) is None
    assert latest_checkpoint(str(tmp_path), latest_filename="latest") == prefix


def test_timestamps_must_match_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Checkpoint timestamps, if provided, must match"):
        generate_checkpoint_state_proto(
            str(tmp_path), "m-2", ["m-1", "m-2"], all_model_checkpoint_timestamps=[1.0]
        )


def test_model_path_equal_to_state_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="conflicts with path used for checkpoint state"):
        update_checkpoint_state(str(tmp_path), str(tmp_path / "checkpoint"))
    assert not (tmp_path / "checkpoint").exists()


def test_cwd_relative_save_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("m-3.index").write_bytes(b"")
    update_checkpoint_state("", "m-3")
    assert Path("checkpoint").read_text() == (
        'model_checkpoint_path: "m-3"\nall_model_checkpoint_paths: "m-3"\n'
    )
    assert latest_checkpoint("") == "m-3"


def test_state_file_is_replaced_atomically_without_leftovers(tmp_path: Path) -> None:
    for step in range(3):
        update_checkpoint_state(str(tmp_path), str(tmp_path / f"m-{step}"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    ckpt = get_checkpoint_state(str(tmp_path))
    assert ckpt is not None and ckpt.model_checkpoint_path == str(tmp_path / "m-2")


def test_failed_replace_removes_the_temporary_file(tmp_path: Path) -> None:
    blocker = tmp_path / "checkpoint"
    blocker.mkdir()  # the rename over it fails
    (blocker / "keep").write_text("x")
    with pytest.raises(OSError):
        update_checkpoint_state(str(tmp_path), str(tmp_path / "m-2"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
    assert os.listdir(blocker) == ["keep"]


# ---- TensorFlow's own files -----------------------------------------------------------


def _tf_v2_checkpoint(prefix: Path) -> None:
    """The files TensorFlow's Saver writes for one V2 checkpoint."""
    for suffix in (".index", ".data-00000-of-00001", ".meta"):
        Path(str(prefix) + suffix).write_bytes(b"tf")


def test_reads_tf_written_state_file_absolute(tmp_path: Path) -> None:
    for step in (10, 20):
        _tf_v2_checkpoint(tmp_path / f"model.ckpt-{step}")
    (tmp_path / "checkpoint").write_text(
        f'model_checkpoint_path: "{tmp_path}/model.ckpt-20"\n'
        f'all_model_checkpoint_paths: "{tmp_path}/model.ckpt-10"\n'
        f'all_model_checkpoint_paths: "{tmp_path}/model.ckpt-20"\n'
    )
    ckpt = get_checkpoint_state(str(tmp_path))
    assert ckpt == CheckpointState(
        f"{tmp_path}/model.ckpt-20", [f"{tmp_path}/model.ckpt-10", f"{tmp_path}/model.ckpt-20"]
    )
    assert latest_checkpoint(str(tmp_path)) == f"{tmp_path}/model.ckpt-20"


def test_reads_tf_written_state_file_relative_with_timestamps(tmp_path: Path) -> None:
    # What tf.train.CheckpointManager writes: relative paths and timestamps.
    _tf_v2_checkpoint(tmp_path / "ckpt-2")
    (tmp_path / "checkpoint").write_text(
        'model_checkpoint_path: "ckpt-2"\n'
        'all_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-2"\n'
        "all_model_checkpoint_timestamps: 1577836800.123456\n"
        "all_model_checkpoint_timestamps: 1577840400.5\n"
        "last_preserved_timestamp: 1577833200.25\n"
    )
    ckpt = get_checkpoint_state(str(tmp_path))
    assert ckpt is not None
    assert ckpt.model_checkpoint_path == os.path.join(str(tmp_path), "ckpt-2")
    assert ckpt.all_model_checkpoint_paths == [
        os.path.join(str(tmp_path), "ckpt-1"),
        os.path.join(str(tmp_path), "ckpt-2"),
    ]
    assert ckpt.all_model_checkpoint_timestamps == [1577836800.123456, 1577840400.5]
    assert ckpt.last_preserved_timestamp == 1577833200.25
    assert latest_checkpoint(str(tmp_path)) == os.path.join(str(tmp_path), "ckpt-2")


def test_writes_timestamps_like_tf(tmp_path: Path) -> None:
    update_checkpoint_state(
        str(tmp_path), "ckpt-2", ["ckpt-1", "ckpt-2"],
        all_model_checkpoint_timestamps=[1577836800.123456, 1577840400.0],
        last_preserved_timestamp=1577833200.25, save_relative_paths=True,
    )  # fmt: skip
    assert (tmp_path / "checkpoint").read_text() == (
        'model_checkpoint_path: "ckpt-2"\n'
        'all_model_checkpoint_paths: "ckpt-1"\n'
        'all_model_checkpoint_paths: "ckpt-2"\n'
        "all_model_checkpoint_timestamps: 1577836800.123456\n"
        "all_model_checkpoint_timestamps: 1577840400.0\n"
        "last_preserved_timestamp: 1577833200.25\n"
    )


def test_checkpoint_exists_mtimes_and_remove_for_tf_files(tmp_path: Path) -> None:
    v2 = tmp_path / "model.ckpt-1"
    v1 = tmp_path / "legacy.ckpt"
    _tf_v2_checkpoint(v2)
    Path(str(v2) + ".data-00001-of-00002").write_bytes(b"tf")
    v1.write_bytes(b"v1")
    assert checkpoint_exists(str(v2)) and checkpoint_exists(v1)
    assert not checkpoint_exists(str(tmp_path / "model.ckpt-2"))
    os.utime(str(v2) + ".index", ns=(0, 1_500_000_000_250_000_000))
    mtimes = get_checkpoint_mtimes([str(v2), str(tmp_path / "missing"), str(v1)])
    assert len(mtimes) == 2  # the missing one is skipped
    assert mtimes[0] == pytest.approx(1_500_000_000.25, abs=1e-6)
    remove_checkpoint(str(v2))
    assert not checkpoint_exists(str(v2))
    assert sorted(os.listdir(tmp_path)) == ["legacy.ckpt"]
    remove_checkpoint(str(v1), checkpoint_format_version=1)
    assert os.listdir(tmp_path) == []
    remove_checkpoint(str(v2))  # already gone: not an error


def test_glob_characters_in_prefix_are_literal(tmp_path: Path) -> None:
    prefix = tmp_path / "run[1]" / "model.ckpt-1"
    prefix.parent.mkdir()
    _tf_v2_checkpoint(prefix)
    assert checkpoint_exists(str(prefix))
    remove_checkpoint(str(prefix))
    assert os.listdir(prefix.parent) == []


# ---- the text format ------------------------------------------------------------------


def test_escapes_like_protobuf_text_format() -> None:
    state = CheckpointState("dir/\"q\" 's' \\ tab\tnl\n\x01 ünï ☃", ["a"])
    assert str(state) == (
        'model_checkpoint_path: "dir/\\"q\\" \\\'s\\\' \\\\ tab\\tnl\\n\\001 ünï ☃"\n'
        'all_model_checkpoint_paths: "a"\n'
    )
    assert CheckpointState.from_text(str(state)) == state


def test_defaults_are_left_out() -> None:
    assert str(CheckpointState()) == ""
    assert CheckpointState.from_text("") == CheckpointState()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('model_checkpoint_path: "a" "b"', CheckpointState("ab")),
        ("model_checkpoint_path: 'x\\'y'", CheckpointState("x'y")),
        ('all_model_checkpoint_paths: ["a", "b"]', CheckpointState("", ["a", "b"])),
        ('model_checkpoint_path: "a"; model_checkpoint_path: "b",', CheckpointState("b")),
        ('# comment\nmodel_checkpoint_path: "\\x41\\101\\u00e9"', CheckpointState("AAé")),
        ("last_preserved_timestamp: -1e3", CheckpointState(last_preserved_timestamp=-1000.0)),
        ("last_preserved_timestamp: 5.", CheckpointState(last_preserved_timestamp=5.0)),
        (
            "all_model_checkpoint_timestamps: [1, 2.5f, -inf, infinity]",
            CheckpointState(all_model_checkpoint_timestamps=[1.0, 2.5, -math.inf, math.inf]),
        ),
    ],
)
def test_parses_text_format_variants(text: str, expected: CheckpointState) -> None:
    assert CheckpointState.from_text(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('model_checkpoint_path "a"', 'Expected ":"'),
        ('foo: "x"', 'has no field named "foo"'),
        ('model_checkpoint_path: ["a"]', "is not repeated"),
        ("model_checkpoint_path: 3", "Expected string but found: '3'"),
        ('last_preserved_timestamp: "x"', "Couldn't parse float"),
        ('model_checkpoint_path: "abc', "String missing ending quote"),
        ('all_model_checkpoint_paths: ["a" "b"', 'Expected "]"'),
        ("{", "Expected identifier or number"),
        ('model_checkpoint_path: "\\q"', "Invalid escape sequence"),
        (b'model_checkpoint_path: "\xff"', "not UTF-8"),
    ],
)
def test_rejects_malformed_text(text: str | bytes, message: str) -> None:
    with pytest.raises(CheckpointStateParseError, match=message):
        CheckpointState.from_text(text)


@given(
    st.text(),
    st.lists(st.text(), max_size=4),
    st.lists(st.floats(allow_nan=False), max_size=4),
    st.floats(allow_nan=False),
)
def test_text_format_round_trips(
    model: str, paths: list[str], timestamps: list[float], preserved: float
) -> None:
    state = CheckpointState(model, paths, timestamps, preserved)
    assert CheckpointState.from_text(str(state)) == state
    assert CheckpointState.from_text(str(state).encode("utf-8")) == state


def test_a_state_file_write_killed_before_its_rename_leaves_only_a_leftover_that_is_cleaned(
    tmp_path: Path,
) -> None:
    """A process dying between writing the temp file and renaming it never damages the state
    file, and the next start's leftover sweep removes the temp file."""
    import subprocess
    import sys

    from trainhooks.checkpoint.storage.commit import remove_leftovers

    update_checkpoint_state(str(tmp_path), str(tmp_path / "model.ckpt-1"))
    before = (tmp_path / "checkpoint").read_bytes()
    child = (
        "import os, sys\n"
        "from trainhooks.checkpoint.management import state_file\n"
        "os.replace = lambda *a: os._exit(9)\n"
        "state_file.update_checkpoint_state(sys.argv[1], os.path.join(sys.argv[1], 'model.ckpt-2'))\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(tmp_path)], check=False)
    assert result.returncode == 9
    assert (tmp_path / "checkpoint").read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "checkpoint"]
    assert len(leftovers) == 1 and leftovers[0].startswith("checkpoint.tmp-")
    assert remove_leftovers(tmp_path) == [str(tmp_path / leftovers[0])]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_failed_state_file_write_names_the_file_and_keeps_errno(tmp_path: Path) -> None:
    import errno

    (tmp_path / "checkpoint").mkdir()  # the final rename cannot replace a directory
    with pytest.raises(OSError) as info:
        update_checkpoint_state(str(tmp_path), str(tmp_path / "model.ckpt-2"))
    assert info.value.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)
    assert f"checkpoint state file {tmp_path / 'checkpoint'}" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temp file left


def test_a_state_file_naming_dot_dot_names_no_checkpoint(tmp_path: Path) -> None:
    from trainhooks.checkpoint.management.state_file import inside_by_name, latest_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "manifest.json").write_text("{}")  # the parent looks like a checkpoint
    (run / "checkpoint").write_text('model_checkpoint_path: ".."\n')
    assert inside_by_name(str(run / ".."), str(run)) is None
    assert inside_by_name("..", str(run)) is None
    assert latest_checkpoint(str(run)) is None
