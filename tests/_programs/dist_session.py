"""One rank of a torch.distributed (gloo) job trained with ``MonitoredTrainingSession``.

The session forms the job by itself: rank 0 is the chief unless ``--chief`` names
another, every rank runs the checkpoint hook and writes its part of each save, and the
ranks agree on ``save_checkpoint_secs`` saves and on stopping after a signal. A DDP
model (or one averaged by an all_reduce per parameter, ``--allreduce manual``) with
Adam; each step's batch is a function of (step, rank), so a resumed job is bit-exact
against one that ran through.

Faults: ``--sigterm-rank R --sigterm-at-step S`` sends SIGTERM to rank R during step S
(only that rank gets it); ``--kill-rank R --kill-at-step S`` SIGKILLs rank R there.

Writes ``<dir>/result-<rank>.json``: the step restored, the step reached, whether the
session was preempted, the steps this rank's hook saved, a digest of the model and
optimizer, or the error that ended the run.

Run (per rank): ``RANK=0 WORLD_SIZE=2 RUN_ID=x python dist_session.py DIR --steps 12``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-steps", type=int, default=None)
    p.add_argument("--save-secs", type=float, default=None)
    p.add_argument("--step-secs", type=float, default=0.0, help="sleep this long in each step")
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--own-hook", action="store_true", help="a CheckpointSaverHook in hooks=")
    p.add_argument("--chief-only-hook", action="store_true", help="... in chief_only_hooks=")
    p.add_argument("--listener-stop-at", type=int, default=None)
    p.add_argument("--chief-unset-elsewhere", action="store_true", help="with --chief")
    p.add_argument("--diverge", action="store_true", help="each rank's weights its own")
    p.add_argument("--timeout", type=float, default=15.0)
    p.add_argument("--master", action="store_true", help="let the session initialize the job")
    p.add_argument("--chief", type=int, default=None, help="is_chief=True on this rank only")
    p.add_argument("--chiefs", type=str, default=None, help="ranks passing is_chief=True")
    p.add_argument("--other-dir-rank", type=int, default=None)
    p.add_argument("--sigterm-rank", type=int, default=None)
    p.add_argument("--sigterm-at-step", type=int, default=None)
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--allreduce", choices=["ddp", "manual", "none"], default="ddp")
    p.add_argument("--out-of-data-rank", type=int, default=None)
    p.add_argument("--out-of-data-at-step", type=int, default=None)
    p.add_argument("--per-rank-rng", action="store_true", help="th.PerRank(th.RNGState())")
    p.add_argument("--max-wait", type=float, default=None, help="max_wait_secs (--timeout)")
    p.add_argument("--late-rank", type=int, default=None, help="this rank starts late ...")
    p.add_argument("--late-secs", type=float, default=0.0, help="... by this many seconds")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    rendezvous = f"file://{args.dir}/rendezvous-{os.environ['RUN_ID']}"
    if not args.master:
        dist.init_process_group(
            "gloo",
            init_method=rendezvous,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=args.timeout),
        )
    result: dict[str, Any] = {"rank": rank}
    began = time.monotonic()
    try:
        result.update(train(args, rank, world, rendezvous))
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["error_type"] = type(e).__name__
        result["traceback"] = traceback.format_exc()
    result["seconds"] = time.monotonic() - began
    with open(os.path.join(args.dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    # After a failed gloo collective a process can abort in its exit handlers.
    os._exit(0)


def record_saves(stop_at: int | None) -> Any:
    """A listener recording the steps whose checkpoints were committed (chief only), and
    asking to stop after the save of step ``stop_at``."""
    import trainhooks as th

    class RecordSaves(th.CheckpointSaverListener):
        def __init__(self) -> None:
            self.steps: list[int] = []

        def after_save(self, session: Any, step: int) -> bool:
            self.steps.append(step)
            return stop_at is not None and step >= stop_at

    return RecordSaves()


def train(args: argparse.Namespace, rank: int, world: int, rendezvous: str) -> dict[str, Any]:
    import trainhooks as th

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if args.diverge:  # an init seeded per rank: DDP would hide it, the replica check not
        with torch.no_grad():
            model[0].weight.add_(rank)
    state: dict[str, Any] = {"model": model, "optimizer": optimizer}
    if args.per_rank_rng:
        # Each rank draws its own noise from torch's global generator, seeded per rank.
        torch.manual_seed(100 + rank)
        state["rng"] = th.PerRank(th.RNGState())
    is_chief = None
    if args.chief is not None:
        is_chief = rank == args.chief
    if args.chief is not None and args.chief_unset_elsewhere and rank != args.chief:
        is_chief = None
    if args.chiefs is not None:
        is_chief = str(rank) in args.chiefs.split(",")
    directory = args.dir if args.other_dir_rank != rank else os.path.join(args.dir, "elsewhere")
    listener = record_saves(args.listener_stop_at)
    save = {"save_checkpoint_steps": args.save_steps, "save_checkpoint_secs": args.save_secs}
    hooks: list[Any] = [th.StopAtStepHook(last_step=args.steps)]
    ddp: Any = None

    def train_step() -> None:
        step = sess.global_step + 1
        if args.sigterm_rank == rank and args.sigterm_at_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        if args.kill_rank == rank and args.kill_at_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.out_of_data_rank == rank and args.out_of_data_at_step == step:
            raise th.errors.OutOfRangeError("this rank's shard of the data is exhausted")
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        if args.per_rank_rng:
            x = x + 0.1 * torch.randn(8, 16)  # this rank's generator, restored to this rank
        if args.allreduce == "none":  # no collective in the step: the ranks drift apart
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
        elif args.allreduce == "manual":
            loss = torch.nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        else:
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            optimizer.zero_grad()
            loss.backward()
        optimizer.step()
        if args.step_secs:
            time.sleep(args.step_secs)

    if args.late_rank == rank:
        time.sleep(args.late_secs)
    chief_only: list[Any] = []
    if args.own_hook or args.chief_only_hook:  # its listener runs on the chief
        hook = th.CheckpointSaverHook(
            directory, save_steps=args.save_steps, save_secs=args.save_secs, listeners=[listener]
        )
        # TF's idiom passes it as chief_only_hooks; in a job it runs on every rank anyway.
        (chief_only if args.chief_only_hook else hooks).append(hook)
        save = {"save_checkpoint_secs": 0}
    with th.MonitoredTrainingSession(
        master=rendezvous if args.master else "",
        is_chief=is_chief,
        chief_only_hooks=chief_only,
        checkpoint_dir=directory,
        state=state,
        hooks=hooks,
        async_checkpoint=args.async_save,
        log_step_count_steps=None,
        save_summaries_steps=None,
        max_wait_secs=args.max_wait if args.max_wait is not None else args.timeout,
        checkpoint_timeout_secs=args.timeout,
        **{k: v for k, v in save.items() if v is not None},
    ) as session:
        sess = session
        start = sess.global_step
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # after the restore
        while not sess.should_stop():
            sess.run(train_step)
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.numpy().tobytes())
    for opt_state in optimizer.state_dict()["state"].values():
        for t in opt_state.values():
            digest.update(t.numpy().tobytes() if torch.is_tensor(t) else repr(t).encode())
    return {
        "start": start,
        "end": sess.global_step,
        "preempted": sess.preempted,
        "chief": sess.job.is_chief,
        "saved": listener.steps,
        "checks": sess.job.checks,
        "digest": digest.hexdigest(),
        "draws": torch.rand(3).tolist(),  # where this rank's global generator ended
        "replicas_differ": sess.job.replicas_differ,
    }


if __name__ == "__main__":
    sys.exit(main())
