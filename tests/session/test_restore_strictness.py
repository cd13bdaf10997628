"""Adding an entry to the state of a running experiment: one argument, ``strict_restore``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

import trainhooks as th


def _train(directory: Path, state: dict, last_step: int, **kwargs) -> None:
    with th.MonitoredTrainingSession(
        checkpoint_dir=str(directory),
        state=state,
        hooks=[th.StopAtStepHook(last_step=last_step)],
        **kwargs,
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: state["w"].__iadd__(1.0))


def test_a_new_entry_needs_strict_restore_false_and_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _train(tmp_path, {"w": np.zeros(4)}, last_step=3)
    grown = {"w": np.zeros(4), "ema": np.full(4, 7.0)}
    with pytest.raises(th.errors.StateMismatchError, match="ema"):
        _train(tmp_path, grown, last_step=5)

    caplog.set_level(logging.INFO)
    _train(tmp_path, grown, last_step=5, strict_restore=False)
    np.testing.assert_array_equal(grown["w"], np.full(4, 5.0))  # restored at 3, trained to 5
    np.testing.assert_array_equal(grown["ema"], np.full(4, 7.0))  # kept as initialized
    assert "ema" in caplog.text

    # The checkpoints saved since hold the new entry: a strict restore works again.
    again = {"w": np.zeros(4), "ema": np.zeros(4)}
    _train(tmp_path, again, last_step=6)
    np.testing.assert_array_equal(again["ema"], np.full(4, 7.0))


def test_a_scaffold_carries_strict_restore_to_the_session_creator(tmp_path: Path) -> None:
    _train(tmp_path, {"w": np.zeros(2)}, last_step=1)
    state = {"w": np.zeros(2), "extra": np.ones(2)}
    scaffold = th.Scaffold(state=state, strict_restore=False)
    with th.MonitoredSession(
        session_creator=th.ChiefSessionCreator(scaffold=scaffold, checkpoint_dir=str(tmp_path))
    ) as sess:
        assert sess.global_step == 1
    np.testing.assert_array_equal(state["w"], np.ones(2))
