"""``restore_state_report``: what a non-strict restore did, per top-level entry, and the
objects even a non-strict restore refuses (those that match nothing saved for them)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.state.tree import (
    RestoreReport,
    StateMismatchError,
    restore_state,
    restore_state_report,
)
from trainhooks.session.session import Session


def _save(state: dict[str, Any], directory: Path) -> str:
    prefix = Saver().save(Session(state), str(directory / "m"), global_step=1)
    assert prefix is not None
    return prefix


def _report(state: dict[str, Any], prefix: str, strict: bool = False) -> RestoreReport:
    with open_checkpoint(prefix) as ckpt:
        return restore_state_report(
            state, ckpt.tree, ckpt.tensor_data, strict, locate=ckpt.locator()
        )


class Scaler:
    """A user object with state_dict()/load_state_dict(): no keys checked in advance."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = state["scale"]


def test_entries_are_sorted_by_what_was_restored(tmp_path: Path) -> None:
    saved = {
        "full": {"a": np.ones(2), "b": [np.ones(1)]},
        "part": {"a": np.ones(2), "b": np.ones(3)},
        "model": torch.nn.Linear(2, 2),
        "scaler": Scaler(4.0),
        "gone": 1,
    }
    prefix = _save(saved, tmp_path)
    state = {
        "full": {"a": np.zeros(2), "b": [np.zeros(1)]},
        "part": {"a": np.zeros(2), "b": np.zeros(4)},
        "model": torch.nn.Linear(2, 2, bias=False),
        "scaler": Scaler(1.0),
        "fresh": np.zeros(1),
    }
    report = _report(state, prefix)
    assert report.restored == ["full", "scaler"]
    assert report.partial == ["part", "model"]
    assert report.not_restored == ["fresh"]
    assert report.unused == ["gone"]
    assert [str(p) for p in report.skipped] == [
        "state['part']['b'] has shape [4], the checkpoint has [3]",
        "state['model'].state_dict()['bias'] is in the checkpoint but not in the module",
        "state['fresh'] is missing from the checkpoint",
        "state['gone'] is in the checkpoint but not in the state",
    ]
    assert state["part"]["a"].tolist() == [1, 1] and state["scaler"].scale == 4.0
    assert str(report) == (
        "2 entries restored in full, 2 in part, 1 not restored, 1 checkpoint entries unused"
    )
    with open_checkpoint(prefix) as ckpt:  # restore_state returns the skipped places
        assert restore_state(state, ckpt.tree, ckpt.tensor_data, strict=False) == report.skipped


def test_a_strict_restore_reports_everything_restored(tmp_path: Path) -> None:
    prefix = _save({"w": np.ones(2), "n": 3}, tmp_path)
    report = _report({"w": np.zeros(2), "n": 0}, prefix, strict=True)
    assert report == RestoreReport(["w", "n"], [], [], [], [])


def test_objects_nested_anywhere_that_match_nothing_are_refused(tmp_path: Path) -> None:
    source = torch.nn.Linear(2, 3)
    prefix = _save({"models": {"student": source, "teacher": torch.nn.Linear(2, 3)}}, tmp_path)
    wrapped = torch.nn.Sequential(torch.nn.Linear(2, 3))  # keys '0.weight', '0.bias'
    teacher = torch.nn.Linear(2, 3)
    before = teacher.weight.clone()
    with pytest.raises(StateMismatchError) as info:
        _report({"models": {"student": wrapped, "teacher": teacher}}, prefix)
    assert [p.path for p in info.value.problems] == ["state['models']['student']"]
    assert "['0.weight', '0.bias'] (2 keys), the checkpoint ['weight', 'bias'] (2 keys)" in str(
        info.value
    )
    assert torch.equal(teacher.weight, before)  # nothing was restored, not even teacher


def test_an_object_saved_as_something_else_is_refused_without_strict(tmp_path: Path) -> None:
    prefix = _save({"m": Scaler(2.0)}, tmp_path)  # saved {"scale": 2.0}
    with pytest.raises(StateMismatchError, match=r"state\['m'\] \(Linear\) matches none"):
        _report({"m": torch.nn.Linear(1, 1)}, prefix)
    with pytest.raises(StateMismatchError, match="Build the state as it was saved"):
        _report({"m": torch.nn.Linear(1, 1)}, prefix, strict=True)  # strict: every problem


def test_a_module_with_some_keys_matching_is_restored_in_part(tmp_path: Path) -> None:
    source = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    prefix = _save({"m": source}, tmp_path)
    target = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 5))
    report = _report({"m": target}, prefix)
    assert report.partial == ["m"] and torch.equal(target[0].weight, source[0].weight)


def test_many_skipped_places_are_logged_up_to_a_limit(tmp_path: Path, caplog: Any) -> None:
    prefix = _save({"d": {str(i): np.ones(1) for i in range(150)}}, tmp_path)
    state = {"d": {str(i): np.zeros(2) for i in range(150)}}
    with caplog.at_level(logging.INFO, logger="trainhooks.checkpoint.state.tree"):
        report = _report(state, prefix)
    assert len(report.skipped) == 150 and report.partial == ["d"]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("has shape [2], the checkpoint has [1]" in line for line in lines) == 100
    assert "Not restored (strict=False): 50 more places (RestoreReport.skipped lists all)" in lines
