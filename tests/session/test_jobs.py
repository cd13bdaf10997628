"""MonitoredTrainingSession as one process of a torch.distributed job: real gloo jobs.

Each job is ``tests/_programs/dist_session.py`` started once per rank; the session forms
the job by itself (no process group passed). What must hold: a job stopped and resumed
ends bit-identical to one that ran through; SIGTERM reaching one rank stops every rank
at the same step with one final save; ``save_checkpoint_secs`` saves are the job's
decision (every save a commit of all ranks); a lost rank ends the survivors with
``PeerLostError``; the start-up checks (one chief, one directory) fail on every rank.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.jobs import run_job
from tests.helpers.paths import PROGRAMS

import trainhooks as th

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # several torch processes per test

PROGRAM = PROGRAMS / "dist_session.py"


def job(directory: Path, world: int, *args: str) -> list[dict[str, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    return run_job(PROGRAM, directory, world, *args)


def ok(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in results:
        assert "error" not in r and "digest" in r, (r.get("traceback"), r["stderr"])
    return results


def listed_steps(directory: Path) -> list[int]:
    state = th.get_checkpoint_state(str(directory))
    assert state is not None
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


@pytest.mark.parametrize(
    ("world", "extra"),
    [(2, ()), (3, ("--allreduce", "manual", "--async-save"))],
    ids=["2-ranks-ddp-sync", "3-ranks-async"],
)
def test_a_session_job_stopped_and_resumed_is_bit_identical_to_one_that_ran_through(
    tmp_path: Path, world: int, extra: tuple[str, ...]
) -> None:
    through = ok(job(tmp_path / "through", world, "--steps", "10", "--save-steps", "4", *extra))
    first = ok(job(tmp_path / "resumed", world, "--steps", "6", "--save-steps", "4", *extra))
    second = ok(job(tmp_path / "resumed", world, "--steps", "10", "--save-steps", "4", *extra))

    assert [r["chief"] for r in first] == [True] + [False] * (world - 1)  # rank 0 by default
    assert {r["end"] for r in first} == {6}
    assert {r["start"] for r in second} == {6}  # every rank restored the chief's choice
    assert {r["digest"] for r in second} == {through[0]["digest"]}
    # The timer restarts from the restored step, as in TF: 6 + 4.
    assert listed_steps(tmp_path / "resumed") == [0, 4, 6, 10]


def test_per_rank_rng_state_is_restored_to_its_own_rank(tmp_path: Path) -> None:
    args = ["--save-steps", "3", "--per-rank-rng"]
    through = ok(job(tmp_path / "through", 2, "--steps", "8", *args))
    ok(job(tmp_path / "resumed", 2, "--steps", "5", *args))
    resumed = ok(job(tmp_path / "resumed", 2, "--steps", "8", *args))

    assert through[0]["draws"] != through[1]["draws"]  # the ranks' generators differ
    assert [r["start"] for r in resumed] == [5, 5]
    # Each rank continues its own sequence: swapped states would swap these.
    assert [r["draws"] for r in resumed] == [r["draws"] for r in through]
    assert {r["digest"] for r in resumed} == {through[0]["digest"]}
    reader = th.load_checkpoint(str(tmp_path / "resumed" / "model.ckpt-5"))
    names = reader.get_variable_to_shape_map()
    assert any(n.startswith("rng/rank0/") for n in names)
    assert any(n.startswith("rng/rank1/") for n in names)


@pytest.mark.parametrize("world", [2, 3])
def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_one_final_save(
    tmp_path: Path, world: int
) -> None:
    rank, step = random.Random(world).randrange(world), random.Random(world).randrange(3, 12)
    args = ["--steps", "400", "--save-steps", "1000", "--own-hook", "--step-secs", "0.01"]
    results = ok(
        job(
            tmp_path / "run",
            world,
            *args,
            "--sigterm-rank",
            str(rank),
            "--sigterm-at-step",
            str(step),
            *(("--allreduce", "manual") if world == 3 else ()),
        )
    )

    ends = {r["end"] for r in results}
    assert len(ends) == 1, results  # one agreed step boundary
    (end,) = ends
    assert step <= end < 400
    assert all(r["preempted"] for r in results)
    assert {r["digest"] for r in results} == {results[0]["digest"]}
    chief = next(r for r in results if r["chief"])
    assert chief["saved"] == [0, end]  # the final step saved once, by the whole job
    assert listed_steps(tmp_path / "run") == [0, end]


def test_save_secs_saves_are_the_jobs_decision_and_every_one_commits(tmp_path: Path) -> None:
    args = ["--steps", "40", "--save-secs", "0.2", "--step-secs", "0.02", "--own-hook"]
    results = ok(job(tmp_path / "run", 2, *args))

    chief, other = results
    assert chief["chief"] and not other["chief"]
    assert other["saved"] == []  # listeners run on the chief only
    saved = chief["saved"]
    # 40 steps of at least 20 ms: the chief's clock asks for saves along the way.
    assert saved[0] == 0 and saved[-1] == 40 and len(saved) >= 3, saved
    assert saved == sorted(set(saved))
    # Every save the chief heard of is a checkpoint committed with both ranks' parts.
    assert listed_steps(tmp_path / "run") == saved[-5:]
    reader = th.load_checkpoint(str(tmp_path / "run" / f"model.ckpt-{saved[1]}"))
    assert reader.get_variable_to_shape_map()
    assert chief["digest"] == other["digest"]


def test_an_explicit_chief_wins_and_commits(tmp_path: Path) -> None:
    args = ["--steps", "6", "--save-steps", "3", "--own-hook", "--chief", "1"]
    results = ok(job(tmp_path / "run", 2, *args))

    assert [r["chief"] for r in results] == [False, True]
    assert results[1]["saved"] == [0, 3, 6] and results[0]["saved"] == []
    assert listed_steps(tmp_path / "run") == [0, 3, 6]


def test_is_chief_true_on_one_rank_and_unset_on_the_others_makes_it_the_chief(
    tmp_path: Path,
) -> None:
    args = ["--steps", "3", "--save-steps", "3", "--own-hook", "--chief", "1"]
    results = ok(job(tmp_path / "run", 2, *args, "--chief-unset-elsewhere"))
    assert [r["chief"] for r in results] == [False, True]


def test_a_listener_of_the_chief_that_asks_to_stop_stops_every_rank_at_one_step(
    tmp_path: Path,
) -> None:
    args = ["--steps", "400", "--save-steps", "3", "--own-hook", "--listener-stop-at", "6"]
    results = ok(job(tmp_path / "run", 2, *args, "--step-secs", "0.01"))

    ends = {r["end"] for r in results}
    assert len(ends) == 1, results
    (end,) = ends
    assert 6 <= end < 400
    assert not any(r["preempted"] for r in results)
    assert listed_steps(tmp_path / "run")[-1] == end  # the final save, by both ranks


def test_a_checkpoint_hook_in_chief_only_hooks_runs_on_every_rank(tmp_path: Path) -> None:
    args = ["--steps", "6", "--save-steps", "3", "--chief-only-hook"]
    results = ok(job(tmp_path / "run", 2, *args))

    assert results[0]["saved"] == [0, 3, 6]  # its listener, on the chief
    assert listed_steps(tmp_path / "run") == [0, 3, 6]


def test_master_initializes_the_job(tmp_path: Path) -> None:
    results = ok(job(tmp_path / "run", 2, "--steps", "6", "--save-steps", "3", "--master"))

    assert [r["chief"] for r in results] == [True, False]
    assert listed_steps(tmp_path / "run") == [0, 3, 6]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--chiefs", "0,1"), "exactly one chief, found 2 (ranks [0, 1] pass is_chief=True)"),
        (("--chiefs", ""), "exactly one chief, found 0 (rank 0 passes is_chief=False)"),
        (("--other-dir-rank", "1"), "Every rank of the job must pass the same checkpoint_dir"),
    ],
    ids=["two-chiefs", "no-chief", "two-directories"],
)
def test_start_up_checks_fail_on_every_rank(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    results = job(tmp_path / "run", 2, "--steps", "4", *args)

    for r in results:
        assert r.get("error_type") == "ValueError", r["stderr"]
        assert message in r["error"]
    assert not any(n.startswith("model.ckpt") for n in os.listdir(tmp_path / "run"))


def test_a_rank_that_stops_alone_never_puts_its_save_into_another_step(tmp_path: Path) -> None:
    # Rank 1 runs out of data at step 7 and closes: its final save (step 6) meets the
    # chief's save of step 8. Neither may commit: no checkpoint mixes two steps.
    args = ["--steps", "40", "--save-steps", "4", "--allreduce", "none"]
    results = job(
        tmp_path / "run", 2, *args, "--out-of-data-rank", "1", "--out-of-data-at-step", "7"
    )

    for r in results:
        assert "every rank must save at the same step the same state" in r.get("error", ""), r
    assert "saves step 6" in results[1]["error"] and "rank 0 saves step 8" in results[1]["error"]
    assert listed_steps(tmp_path / "run") == [0, 4]


def test_replicas_that_differ_after_start_up_are_named(tmp_path: Path) -> None:
    same = ok(job(tmp_path / "same", 2, "--steps", "2", "--save-steps", "2"))
    differ = ok(job(tmp_path / "differ", 2, "--steps", "2", "--save-steps", "2", "--diverge"))

    assert [r["replicas_differ"] for r in same] == [[], []]
    assert [r["replicas_differ"] for r in differ] == [["model"], ["model"]]
    assert "State entries ['model'] differ between the ranks" in differ[0]["stderr"]


def test_a_chief_that_never_arrives_ends_the_others_with_tfs_deadline_error(
    tmp_path: Path,
) -> None:
    args = ["--steps", "4", "--max-wait", "2", "--late-rank", "0", "--late-secs", "8"]
    results = job(tmp_path / "run", 2, *args)

    waiting = results[1]
    assert waiting.get("error_type") == "DeadlineExceededError", waiting["stderr"]
    assert waiting["error"].startswith(
        "DeadlineExceededError: Session was not ready after waiting 2 secs."
    )
    assert not any(n.startswith("model.ckpt") for n in os.listdir(tmp_path / "run"))


def test_a_lost_rank_ends_the_survivors_with_peer_lost_error(tmp_path: Path) -> None:
    args = ["--steps", "400", "--save-steps", "2", "--kill-rank", "1", "--kill-at-step", "5"]
    results = job(tmp_path / "run", 2, *args)

    survivor, killed = results
    assert killed["returncode"] == -9 and "error" not in killed
    assert survivor.get("error_type") == "PeerLostError", survivor["stderr"]
    assert issubclass(th.errors.PeerLostError, RuntimeError)  # as torch reports it
    assert "Rank 0 of 2" in survivor["error"]
    # Nothing half-written is listed; the last committed checkpoint restores.
    steps = listed_steps(tmp_path / "run")
    assert steps and steps[-1] <= 4
    reader = th.load_checkpoint(str(tmp_path / "run" / f"model.ckpt-{steps[-1]}"))
    assert reader.get_variable_to_shape_map()
