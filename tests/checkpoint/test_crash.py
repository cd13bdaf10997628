"""SIGKILL a real training process at random moments: no listed checkpoint is ever damaged.

The training process (``tests/_programs/train_loop.py``) saves every step, synchronously
through ``MonitoredTrainingSession`` or in the background with ``Saver(async_save=True)``.
After every kill the latest checkpoint must restore bit for bit to the state of its
step, every listed checkpoint must verify, and the next start must find no leftovers.
``tools/crash_soak.py`` runs the same loop 500+ times.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tests.helpers.paths import PROGRAMS

sys.path.insert(0, str(PROGRAMS))  # tests/_programs/*.py are imported by name

import crash_driver

# 50 SIGKILLs of a real training process, each restart verified.
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("mode", "seed"), [("mts", 1), ("async", 2)])
def test_sigkill_at_random_moments_never_damages_a_listed_checkpoint(
    tmp_path: Path, mode: str, seed: int
) -> None:
    result = crash_driver.crash_loop(tmp_path / "ckpt", kills=25, mode=mode, seed=seed)

    assert result.kills == 25
    assert result.leftovers_seen_at_start == 0
    assert result.restores_checked >= 20
    # Training made progress across the kills: the checkpoints are not stuck at the start.
    assert result.final_step > 25, result.summary()
