"""One run of a job that a scheduler starts, preempts and requeues: the seeds' pattern.

``MonitoredTrainingSession(checkpoint_dir=DIR, chief_only_hooks=[CheckpointSaverHook(DIR,
save_steps=N, listeners=[...])], hooks=[StopAtStepHook(...)])``, as the seeds' example
writes it, on a NumPy state whose value after step ``k`` is ``k`` in every element.

Prints one JSON line: the step restored, the step reached, how many steps ran, whether
a signal stopped it, and the steps the listener saw saved. ``--sigterm-at K`` sends the
process a real SIGTERM after step ``K``, as a scheduler preempting the job would.

Run: ``python restart_run.py DIR --num-steps 10 --save-steps 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

import numpy as np

import trainhooks as th


class SavedSteps(th.CheckpointSaverListener):
    """Records the step of every checkpoint the hook saved."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def after_save(self, session: th.Session, global_step_value: int) -> None:
        self.steps.append(int(global_step_value))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--num-steps", type=int, default=None)
    p.add_argument("--last-step", type=int, default=None)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--sigterm-at", type=int, default=None)
    p.add_argument("--exit-on-preemption", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    state = {"w": np.zeros(16, np.float64)}
    listener = SavedSteps()
    hook = th.CheckpointSaverHook(args.dir, save_steps=args.save_steps, listeners=[listener])
    ran = 0

    def train_step() -> None:
        nonlocal ran
        state["w"] += 1.0
        ran += 1

    with th.MonitoredTrainingSession(
        checkpoint_dir=args.dir,
        state=state,
        chief_only_hooks=[hook],
        hooks=[th.StopAtStepHook(num_steps=args.num_steps, last_step=args.last_step)],
        exit_on_preemption=args.exit_on_preemption,
    ) as sess:
        start = sess.global_step
        assert np.all(state["w"] == start), "the restored state is not the restored step's"
        while not sess.should_stop():
            sess.run(train_step)
            if args.sigterm_at is not None and sess.global_step == args.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
    report = {
        "start": start,
        "end": sess.global_step,
        "ran": ran,
        "preempted": sess.preempted,
        "saved": listener.steps,
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
