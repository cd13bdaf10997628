"""Every rank writes, one commit: real gloo jobs of 2 and 3 processes (DDP + Adam).

Each job is ``tests/_programs/dist_train.py`` started once per rank. A job killed and
resumed must end bit-identical to one that ran through; a rank SIGKILLed in the middle
of a save must leave no new checkpoint listed, the previous one intact, and the
survivors failing within the checkpoint timeout instead of hanging.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.jobs import run_job
from tests.helpers.paths import PROGRAMS

import trainhooks as th

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # several torch processes per test

PROGRAM = PROGRAMS / "dist_train.py"


def job(
    directory: Path,
    world: int,
    *args: str,
    timeout: float = 150,
    after_first_exit: float | None = None,
) -> list[dict[str, Any]]:
    """Run one job of ``world`` ranks to the end; every rank's result."""
    return run_job(
        PROGRAM, directory, world, *args, timeout=timeout, after_first_exit=after_first_exit
    )


def steps_on_disk(directory: Path) -> list[int]:
    return sorted(int(n.rsplit("-", 1)[1]) for n in os.listdir(directory) if "ckpt-" in n)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_job_stopped_and_resumed_is_bit_identical_to_one_that_ran_through(
    tmp_path: Path, world: int, mode: str
) -> None:
    extra = ["--async-save"] if mode == "async" else []
    # DDP with 3 ranks is not restart-deterministic itself (dist_train.py says why): there
    # the gradients are averaged by an all_reduce per parameter instead.
    extra += ["--allreduce", "ddp" if world == 2 else "manual"]
    through, resumed = tmp_path / "through", tmp_path / "resumed"
    through.mkdir()
    resumed.mkdir()
    reference = job(through, world, "--steps", "12", *extra)
    assert all("error" not in r for r in reference), reference
    assert len({r["digest"] for r in reference}) == 1  # DDP replicas agree

    first = job(resumed, world, "--steps", "8", *extra)
    assert [r["end"] for r in first] == [8] * world
    # Every rank wrote part of the data files of one checkpoint.
    with th.load_checkpoint(str(resumed / "model.ckpt-8")) as reader:
        assert reader.global_step == 8
    data_files = [n for n in os.listdir(resumed / "model.ckpt-8") if n.endswith(".safetensors")]
    assert len(data_files) >= world

    second = job(resumed, world, "--steps", "12", *extra)
    assert [(r["start"], r["end"]) for r in second] == [(8, 12)] * world
    assert {r["restored"] for r in second} == {str(resumed / "model.ckpt-8")}
    assert {r["digest"] for r in second} == {reference[0]["digest"]}
    assert steps_on_disk(resumed) == [4, 8, 12]


def test_a_rank_killed_mid_save_commits_nothing_and_no_survivor_hangs(tmp_path: Path) -> None:
    results = job(
        tmp_path, 2, "--steps", "12", "--kill-rank", "1", "--kill-at-save", "2", "--timeout", "8"
    )
    assert "digest" not in results[1]  # killed: no result
    survivor = results[0]
    assert "error" in survivor, survivor
    assert any(word in survivor["error"] for word in ("peer", "writer failed", "rank 1"))
    # The save at step 8 was never committed; the one at step 4 is listed and intact.
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-4")
    state = th.get_checkpoint_state(str(tmp_path))
    assert state is not None and state.all_model_checkpoint_paths == [
        str(tmp_path / "model.ckpt-4")
    ]
    with th.load_checkpoint(str(tmp_path / "model.ckpt-4")) as reader:
        assert reader.global_step == 4

    # The next start removes the staging leftovers and resumes from step 4.
    again = job(tmp_path, 2, "--steps", "8")
    assert [(r["start"], r["end"]) for r in again] == [(4, 8)] * 2
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_a_rank_that_hangs_mid_save_ends_the_survivor_within_the_timeout(tmp_path: Path) -> None:
    args = ["--steps", "12", "--kill-rank", "1", "--kill-at-save", "2", "--hang"]
    # The hung rank is killed 5 s after the survivor ended (or at the job's deadline,
    # which leaves a loaded machine time to start torch twice; the survivor must end
    # before it). How long the survivor's failing save took is measured in the survivor.
    results = job(tmp_path, 2, *args, "--timeout", "6", timeout=150, after_first_exit=5)
    assert results[1]["killed_at_deadline"] and "digest" not in results[1]
    assert not results[0]["killed_at_deadline"]
    survivor = results[0]
    assert survivor.get("error", "").startswith("CheckpointGroupError"), survivor["stderr"]
    assert "timeout 6 s" in survivor["error"] and "peer was lost" in survivor["error"]
    # The 6 s of the checkpoint collective, and a few for the survivor's own writes.
    assert survivor["save_secs"] <= 6 + 4, survivor
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-4")


def test_a_rank_that_cannot_read_the_checkpoint_fails_the_whole_job_at_start_up(
    tmp_path: Path,
) -> None:
    job(tmp_path, 2, "--steps", "4")
    results = job(tmp_path, 2, "--steps", "8", "--unreadable-rank", "1", "--timeout", "8")
    for result in results:  # no rank trains from a state the others do not share
        assert "digest" not in result, result
        assert "rank 1" in result["error"], result
        assert "model.ckpt-4" in result["error"] and "Permission denied" in result["error"]
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-4")
