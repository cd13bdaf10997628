"""``restore_checkpoint``: verification runs alongside the checks, and still comes first.

The checksums of the whole checkpoint are computed on a thread while the state is
checked against the saved tree; nothing is written until both are done. A checkpoint
that is corrupt must therefore be reported as corrupt (``DataLossError``), even when the
state also does not fit it, and must leave the state exactly as it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.helpers.checkpoints import flip_byte_of

from trainhooks import errors
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.state.tree import StateMismatchError
from trainhooks.session.session import Session

MIB = 2**20


def make_state(shape: tuple[int, ...] = (4, 3), *, with_torch: bool = True) -> dict[str, Any]:
    """Plain NumPy arrays (restored on the fast path), and a torch tensor (the generic one)."""
    state: dict[str, Any] = {
        "w": np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape),
        "big": np.linspace(0, 1, MIB // 4 + 1, dtype=np.float32),  # its own checksum
        "small": {f"s{i}": np.full(5, i, dtype=np.int32) for i in range(20)},
        "torch": torch.arange(6, dtype=torch.float64),
        "epoch": 2,
    }
    if not with_torch:
        del state["torch"]
    return state


def mismatching_state(mismatch: str, *, with_torch: bool = True) -> dict[str, Any]:
    """A state that does not fit ``make_state()``'s checkpoint, in one of three ways."""
    if mismatch == "wrong_shape":
        return make_state(shape=(3, 4), with_torch=with_torch)
    state = make_state(with_torch=with_torch)
    if mismatch == "missing_entry":  # the state has an entry the checkpoint lacks
        state["small"]["s20"] = np.zeros(5, dtype=np.int32)
    else:  # the checkpoint has an entry the state lacks
        del state["small"]["s19"]
    return state


def snapshot(state: dict[str, Any]) -> dict[str, bytes]:
    out = {
        "w": state["w"].tobytes(),
        "big": state["big"].tobytes(),
        "epoch": str(state["epoch"]).encode(),
    }
    if "torch" in state:
        out["torch"] = state["torch"].numpy().tobytes()
    out.update({k: v.tobytes() for k, v in state["small"].items()})
    return out


def scramble(state: dict[str, Any]) -> None:
    for array in [state["w"], state["big"], *state["small"].values()]:
        array[...] = 7
    if "torch" in state:
        state["torch"].fill_(7)
    state["epoch"] = 5


@pytest.fixture
def saved(tmp_path: Path) -> str:
    prefix = Saver().save(Session(make_state(), global_step=30), str(tmp_path / "m"), 30)
    assert prefix is not None
    return prefix


@pytest.fixture
def saved_numpy(tmp_path: Path) -> str:
    state = make_state(with_torch=False)
    prefix = Saver().save(Session(state, global_step=30), str(tmp_path / "n"), 30)
    assert prefix is not None
    return prefix


def assert_refused_as_corrupt(prefix: str, state: dict[str, Any], strict: bool) -> None:
    """Restoring ``state`` from ``prefix`` raises DataLossError and changes nothing."""
    before = snapshot(state)
    objects = {k: v for k, v in state.items() if k != "epoch"}
    session = Session(state, global_step=3)

    with pytest.raises(errors.DataLossError, match="checksum mismatch") as info:
        Saver().restore(session, prefix, strict=strict)

    assert not isinstance(info.value, StateMismatchError)
    assert prefix in str(info.value)
    assert snapshot(state) == before
    assert session.global_step == 3
    assert all(state[k] is v for k, v in objects.items())


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("mismatch", ["wrong_shape", "missing_entry", "unexpected_entry"])
@pytest.mark.parametrize("corrupt", ["w", "big", "small/s3", "torch"])
def test_a_corrupt_checkpoint_that_also_mismatches_raises_data_loss_and_changes_nothing(
    saved: str, corrupt: str, mismatch: str, strict: bool
) -> None:
    flip_byte_of(saved, corrupt)
    state = mismatching_state(mismatch)
    scramble(state)
    assert_refused_as_corrupt(saved, state, strict)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("mismatch", ["wrong_shape", "missing_entry", "unexpected_entry"])
@pytest.mark.parametrize("corrupt", ["w", "big", "small/s3", "small/s19"])
def test_with_every_array_on_the_fast_path_verification_still_comes_first(
    saved_numpy: str, corrupt: str, mismatch: str, strict: bool
) -> None:
    """Plain NumPy arrays that fit are planned from the mapped file without reading a
    checked tensor, so with an entry missing or unexpected nothing in the checks waits
    for the checksums: that wait must still come before the mismatch is raised, and
    before anything is written."""
    flip_byte_of(saved_numpy, corrupt)
    state = mismatching_state(mismatch, with_torch=False)
    scramble(state)
    assert_refused_as_corrupt(saved_numpy, state, strict)


@pytest.mark.parametrize(
    ("mismatch", "problem"),
    [
        ("wrong_shape", r"state\['w'\] has shape \[3, 4\], the checkpoint has \[4, 3\]"),
        ("missing_entry", r"state\['small'\]\['s20'\] is missing from the checkpoint"),
        ("unexpected_entry", r"state\['small'\]\['s19'\] is in the checkpoint but not in"),
    ],
)
def test_the_same_mismatch_without_corruption_is_a_state_mismatch(
    saved: str, mismatch: str, problem: str
) -> None:
    """The counterpart: the mismatch alone is reported as such (so the test above can fail)."""
    with pytest.raises(StateMismatchError, match=problem):
        Saver().restore(Session(mismatching_state(mismatch)), saved)


def test_a_corrupt_checkpoint_whose_state_fits_is_refused_too(saved: str) -> None:
    flip_byte_of(saved, "small/s3")
    state = make_state()
    state["w"][...] = 0
    with pytest.raises(errors.DataLossError):
        Saver().restore(Session(state), saved)
    assert not state["w"].any()


def test_restore_latest_skips_a_corrupt_newest_checkpoint_that_would_not_fit(
    tmp_path: Path, caplog: Any
) -> None:
    """The newest checkpoint is corrupt (and of another shape): it is skipped as corrupt,
    and the older one, which fits, is restored."""
    saver = Saver()
    old = saver.save(Session(make_state(), global_step=10), str(tmp_path / "m"), 10)
    newest = saver.save(Session(make_state(shape=(2, 6)), global_step=20), str(tmp_path / "m"), 20)
    saver.close()
    assert old is not None and newest is not None
    flip_byte_of(newest, "w")
    state = make_state()
    state["w"][...] = 0
    session = Session(state)
    with caplog.at_level("WARNING"):
        assert Saver().restore_latest(session, str(tmp_path)) == old
    assert session.global_step == 10
    assert state["w"].tobytes() == make_state()["w"].tobytes()
    assert "failed verification" in caplog.text and newest in caplog.text


def test_a_file_of_a_checkpoint_is_named_as_such_not_as_a_tensorflow_checkpoint(
    tmp_path: Path,
) -> None:
    from trainhooks.checkpoint.format.opening import open_checkpoint
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.errors import NotFoundError
    from trainhooks.session.session import Session

    prefix = Saver().save(Session({"w": np.ones(2)}), str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    manifest = os.path.join(prefix, "manifest.json")
    with pytest.raises(ValueError, match="is a file of the trainhooks checkpoint") as info:
        Saver().restore(Session({"w": np.ones(2)}), manifest)
    assert "TensorFlow" not in str(info.value) and f"pass {prefix}" in str(info.value)
    with pytest.raises(NotFoundError, match=f"pass {prefix}"):
        open_checkpoint(manifest)
