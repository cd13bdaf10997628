"""Per-step overhead of a monitored session over a bare Python loop.

Runs the same no-op step N times in three ways and prints µs/step:

* a bare loop calling the step function;
* ``MonitoredSession`` with no hooks;
* ``MonitoredTrainingSession(checkpoint_dir=tmp, state={...})`` with its default chief
  hooks (StepCounterHook, SummarySaverHook, CheckpointSaverHook every 600 s).

The goal is at most 5 µs/step of overhead for the default chief hooks. Each variant is
timed ``--repeat`` times and the best run is reported (the least disturbed by the
machine). Usage::

    python benchmarks/bench_step_overhead.py --steps 200000 --repeat 5
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable

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


def best_of(fn: Callable[[int], float], steps: int, repeat: int) -> float:
    return min(fn(steps) for _ in range(repeat)) / steps * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000, help="steps per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs; the best counts")
    parser.add_argument("--goal-us", type=float, default=5.0, help="overhead goal, µs/step")
    args = parser.parse_args(argv)

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
