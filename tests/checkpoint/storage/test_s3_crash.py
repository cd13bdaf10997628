"""SIGKILL a real training process saving every step to S3, at random moments.

The same loop as ``tests/checkpoint/test_crash.py`` (``tests/_programs/crash_driver.py``),
with the checkpoint directory on a local S3 server (moto, and SeaweedFS): after every kill the latest
checkpoint restores bit for bit to the state of its step, every listed checkpoint
verifies, the step never goes back, and the next start finds no checkpoint prefix
without its manifest and no unfinished upload.
"""

from __future__ import annotations

import sys

import pytest
from tests.helpers import seaweedfs
from tests.helpers.paths import PROGRAMS

sys.path.insert(0, str(PROGRAMS))  # tests/_programs/*.py are imported by name

import crash_driver

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("mode", "seed"), [("mts", 11), ("async", 12)])
def test_sigkill_while_saving_to_s3_never_loses_a_committed_checkpoint(
    s3_bucket: str, mode: str, seed: int
) -> None:
    # The kills land within 0.25 s of start-up or of two completed steps; the training
    # process finds the server through AWS_ENDPOINT_URL, inherited from this one.
    result = crash_driver.crash_loop(f"{s3_bucket}/run", kills=12, mode=mode, seed=seed)
    assert result.kills == 12
    assert result.leftovers_seen_at_start == 0, result.summary()
    assert result.restores_checked >= 8, result.summary()
    # Progress across the kills: each one after start-up came two steps after a save.
    assert result.final_step >= result.kills - result.kills_before_ready, result.summary()


def test_sigkill_while_saving_to_seaweedfs_never_loses_a_committed_checkpoint(
    seaweedfs_bucket: str, seaweedfs_endpoint: str
) -> None:
    # The second server: its own multipart, ETags and conditional writes. The training
    # process reaches it through AWS_ENDPOINT_URL; this one through the registered storage.
    env = {"AWS_ENDPOINT_URL": seaweedfs_endpoint, **seaweedfs.CREDENTIALS}
    result = crash_driver.crash_loop(f"{seaweedfs_bucket}/run", kills=10, seed=13, env=env)
    assert result.kills == 10
    assert result.leftovers_seen_at_start == 0, result.summary()
    assert result.restores_checked >= 6, result.summary()
    assert result.final_step >= result.kills - result.kills_before_ready, result.summary()
