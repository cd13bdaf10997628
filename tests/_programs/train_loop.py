"""A real training process for the crash, SIGTERM and lock tests: deterministic, tiny, NumPy only.

The state after step ``k`` is a pure function of ``k`` (:func:`state_at`), so a test can
check any restored checkpoint bit for bit. Modes:

* ``mts``: ``MonitoredTrainingSession`` (writer lock, restore, SIGTERM handling),
  saving every ``--save-steps`` steps synchronously through ``CheckpointSaverHook``;
* ``async``: a raw ``Session`` with ``Saver(async_save=True)`` saving every step in
  the background.

With ``--upload TARGET`` (``mts`` only) the checkpoint hook carries an
``UploadListener(TARGET, keep=3)``: checkpoints are saved to ``DIR`` and uploaded to
``TARGET`` in the background.

Lines on stdout (flushed): ``ready <step> leftovers=<n>`` once the first save after
start-up is committed (``n`` = ``*.tmp-*``/``*.old-*`` entries left in the directory),
``step <k>`` after each completed step, ``hanging`` when ``--hang-at`` blocks a step, ``end <k>`` from a hook's ``end``, ``closed``
and ``handler <restored|replaced>`` after the session closes.

Run: ``python train_loop.py DIR --mode mts --steps 1000``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import numpy as np

_LEFTOVER = re.compile(r".+\.(tmp|old)-[0-9a-f]{12}")


def initial_state() -> dict[str, Any]:
    """The state before step 0."""
    return {
        "w": np.linspace(-1.0, 1.0, 64, dtype=np.float32),
        "v": np.zeros(8, dtype=np.float64),
        "meta": {"count": 0, "name": "step-0"},
    }


def advance(state: dict[str, Any]) -> None:
    """One training step, in place: a non-linear update of every entry."""
    k = state["meta"]["count"]
    w, v = state["w"], state["v"]
    np.sin(w * np.float32(1.5), out=w)
    w += np.float32((k % 7) * 0.25)
    v *= 0.5
    v += k + w[:8].astype(np.float64)
    state["meta"] = {"count": k + 1, "name": f"step-{k + 1}"}


def state_at(step: int) -> dict[str, Any]:
    """The state after ``step`` steps."""
    state = initial_state()
    for _ in range(step):
        advance(state)
    return state


def leftovers(directory: str) -> list[str]:
    """Entries an interrupted save left in ``directory``: on an object store (``s3://``),
    checkpoint prefixes that hold files but no manifest, and unfinished uploads."""
    if "://" not in directory:
        return sorted(n for n in os.listdir(directory) if _LEFTOVER.fullmatch(n))
    from trainhooks.checkpoint.storage import storage_for

    storage: Any = storage_for(directory)
    found = []
    for name in storage.list_dir(directory):
        if name.startswith("model.ckpt-"):
            # An emptied prefix (a deleted checkpoint's, which some stores still list)
            # holds nothing to leave over.
            entries = storage.list_dir(os.path.join(directory, name))
            if entries and "manifest.json" not in entries:
                found.append(name)
    bucket, _, key = directory[len("s3://") :].partition("/")
    uploads = storage.client.s3.list_multipart_uploads(Bucket=bucket, Prefix=key + "/")
    return sorted(found + [u["Key"] for u in uploads.get("Uploads", ())])


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run_mts(args: argparse.Namespace) -> None:
    import trainhooks as th

    class EndReporter(th.SessionRunHook):
        def end(self, session: Any) -> None:
            _say(f"end {session.global_step}")

    state = initial_state()

    def train_step() -> None:
        k = state["meta"]["count"]
        if args.hang_at is not None and k + 1 == args.hang_at:
            _say("hanging")
            threading.Event().wait()  # a step that never finishes
        advance(state)
        if args.step_secs:
            time.sleep(args.step_secs)  # stands for compute; lets a signal land mid-step

    hooks: list[Any] = [th.StopAtStepHook(last_step=args.steps), EndReporter()]
    if args.upload:
        listener = th.UploadListener(args.upload, keep=3)
        saver = th.Saver(max_to_keep=3)
        hooks.append(
            th.CheckpointSaverHook(
                args.dir, save_steps=args.save_steps, saver=saver, listeners=[listener]
            )
        )
    before = signal.getsignal(signal.SIGTERM)
    with th.MonitoredTrainingSession(
        checkpoint_dir=args.dir,
        state=state,
        save_checkpoint_steps=None if args.upload else args.save_steps,
        save_summaries_steps=0,
        log_step_count_steps=0,
        hooks=hooks,
        preemption_grace_period_secs=args.grace,
    ) as sess:
        _say(f"ready {state['meta']['count']} leftovers={len(leftovers(args.dir))}")
        while not sess.should_stop():
            sess.run(train_step)
            _say(f"step {state['meta']['count']}")
    _say("closed")
    restored = signal.getsignal(signal.SIGTERM) == before
    _say(f"handler {'restored' if restored else 'replaced'}")


def run_async(args: argparse.Namespace) -> None:
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.session.session import Session

    state = initial_state()
    sess = Session(state)
    saver = Saver(async_save=True, max_to_keep=3)
    saver.restore_latest(sess, args.dir)
    prefix = os.path.join(args.dir, "model.ckpt")
    saver.save(sess, prefix, global_step=sess.global_step)
    saver.wait()
    _say(f"ready {sess.global_step} leftovers={len(leftovers(args.dir))}")
    while sess.global_step < args.steps:
        advance(state)
        sess.global_step += 1
        saver.save(sess, prefix, global_step=sess.global_step)
        _say(f"step {sess.global_step}")
    saver.close()
    _say("closed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir")
    parser.add_argument("--mode", choices=["mts", "async"], default="mts")
    parser.add_argument("--steps", type=int, default=10**9)
    parser.add_argument("--save-steps", type=int, default=1)
    parser.add_argument("--step-secs", type=float, default=0.0)
    parser.add_argument("--hang-at", type=int, default=None)
    parser.add_argument("--grace", type=float, default=25.0)
    parser.add_argument("--upload", default=None, help="upload each checkpoint there too")
    args = parser.parse_args()
    if "://" not in args.dir:
        os.makedirs(args.dir, exist_ok=True)
    if args.mode == "mts":
        run_mts(args)
    else:
        run_async(args)


if __name__ == "__main__":
    main()
