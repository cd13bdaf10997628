"""Per-step overhead of a monitored session over a bare Python loop.

Runs the same no-op step N times in three ways and prints µs/step:

* a bare loop calling the step function;
* ``MonitoredSession`` with no hooks;
* ``MonitoredTrainingSession(checkpoint_dir=tmp, state={...})`` with its default chief
  hooks (StepCounterHook, SummarySaverHook, CheckpointSaverHook every 600 s).

The goal is at most 5 µs/step of overhead for the default chief hooks. Each variant is
timed ``--repeat`` times and the best run is reported (the least disturbed by the
machine).

``--world-size N`` (N > 1) adds a fourth row: the same ``MonitoredTrainingSession`` on
every rank of a gloo job of N processes (``file://`` rendezvous, started here), where
the ranks agree on save and stop decisions at check steps; the row is the slowest
rank's best run, with how many agreements it made. The goal there: within a few µs of
the one-process figure. Usage::

    python benchmarks/bench_step_overhead.py --steps 200000 --repeat 5
    python benchmarks/bench_step_overhead.py --steps 100000 --repeat 3 --world-size 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import trainhooks as th


def noop_step() -> None:
    return None


def time_bare(steps: int) -> float:
    step = noop_step
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def _time_session(sess: th.MonitoredSession, steps: int) -> float:
    run = sess.run
    step = noop_step
    start = time.perf_counter()
    for _ in range(steps):
        run(step)
    elapsed = time.perf_counter() - start
    sess.close()
    return elapsed


def time_monitored_no_hooks(steps: int) -> float:
    creator = th.ChiefSessionCreator(state={"w": np.zeros(4)})
    return _time_session(th.MonitoredSession(session_creator=creator), steps)


def time_mts_default_hooks(steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        sess = th.MonitoredTrainingSession(checkpoint_dir=tmp, state={"w": np.zeros(4)})
        return _time_session(sess, steps)


def job_rank(steps: int, repeat: int, rendezvous: str, out: str) -> None:
    """One rank of the ``--world-size`` job: the default-hooks session, best of ``repeat``."""
    import torch.distributed as dist

    best, checks = float("inf"), 0
    for i in range(repeat):
        # The same directory on every rank (the job checks that they agree); the first
        # session initializes torch.distributed from master=, as a user's may.
        directory = os.path.join(os.path.dirname(out), f"ckpt-{i}")
        sess = th.MonitoredTrainingSession(
            master=rendezvous, checkpoint_dir=directory, state={"w": np.zeros(4)}
        )
        job = sess.job
        best = min(best, _time_session(sess, steps))
        checks = job.checks if job is not None else 0
    with open(out, "w") as f:
        json.dump({"us": best / steps * 1e6, "checks": checks}, f)
    dist.destroy_process_group()


def time_job(world_size: int, steps: int, repeat: int) -> tuple[float, int]:
    """µs/step of the slowest rank of a ``world_size`` job, and its agreements per run."""
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world_size):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size))
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--rank-of-job",
                        f"file://{tmp}/rendezvous",
                        f"{tmp}/rank{rank}.json",
                        "--steps",
                        str(steps),
                        "--repeat",
                        str(repeat),
                    ],
                    env=env,
                )
            )
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"a rank of the job failed with status {p.returncode}")
        results = [json.loads(Path(f"{tmp}/rank{r}.json").read_text()) for r in range(world_size)]
    slowest = max(results, key=lambda r: r["us"])
    return slowest["us"], slowest["checks"]


def best_of(fn: Callable[[int], float], steps: int, repeat: int) -> float:
    return min(fn(steps) for _ in range(repeat)) / steps * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="steps per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs; the best counts")
    parser.add_argument("--goal-us", type=float, default=5.0, help="overhead goal, µs/step")
    parser.add_argument("--world-size", type=int, default=1, help="also time a gloo job")
    parser.add_argument("--rank-of-job", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_of_job:
        job_rank(args.steps, args.repeat, *args.rank_of_job)
        return 0

    bare = best_of(time_bare, args.steps, args.repeat)
    rows = [
        ("bare loop", bare),
        ("MonitoredSession, no hooks", best_of(time_monitored_no_hooks, args.steps, args.repeat)),
        (
            "MonitoredTrainingSession, default hooks",
            best_of(time_mts_default_hooks, args.steps, args.repeat),
        ),
    ]
    print(f"{'variant':<42} {'µs/step':>9} {'overhead µs':>12}")
    for name, us in rows:
        print(f"{name:<42} {us:>9.3f} {us - bare:>12.3f}")
    overhead = rows[-1][1] - bare
    verdict = "meets" if overhead <= args.goal_us else "MISSES"
    print(f"default-hooks overhead {overhead:.3f} µs/step {verdict} the {args.goal_us} µs goal")
    if args.world_size > 1:
        us, checks = time_job(args.world_size, args.steps, args.repeat)
        name = f"the same, each rank of a {args.world_size}-process job"
        print(f"{name:<42} {us:>9.3f} {us - bare:>12.3f}")
        print(
            f"job over one process: {us - rows[-1][1]:+.3f} µs/step "
            f"({checks} agreements in {args.steps} steps)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
