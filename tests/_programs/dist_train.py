"""One rank of a torch.distributed (gloo) training job that checkpoints with every rank writing.

A DDP model (or one averaged by an all_reduce per parameter) with Adam; each step's batch is a function of (step, rank), so a resumed run
is bit-exact against an uninterrupted one. All ranks call ``Saver.save`` every
``--save-every`` steps and ``Saver.restore_latest`` at start (collectives on a
``TorchProcessGroup``). ``--kill-rank R --kill-at-save K`` SIGKILLs rank R in the middle
of its K-th save (after it wrote a data file, before the commit), as a crash would.

Writes ``<dir>/result-<rank>.json``: the step restored, the step reached and a digest of
the model and optimizer, or the error that ended the run; and ``save_secs``, how long
the last save took, a failed one too (measured here, where a loaded machine's start-up
and training steps do not count).

Run (per rank): ``RANK=0 WORLD_SIZE=2 python dist_train.py DIR --steps 12``.
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
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--kill-rank", type=int, default=None)
    # SIGSTOP instead of SIGKILL: the rank hangs mid-save (the harness kills it later).
    p.add_argument("--hang", action="store_true")
    p.add_argument("--kill-at-save", type=int, default=None)
    p.add_argument("--timeout", type=float, default=15.0)
    # Save and restore there instead of DIR (e.g. s3://bucket/run); DIR keeps the results.
    p.add_argument("--checkpoint-dir", default=None)
    # This rank cannot read the checkpoint directory (a mount missing on its machine):
    # every open of a path below it fails with EACCES, as the kernel would say.
    p.add_argument("--unreadable-rank", type=int, default=None)
    # With three or more ranks DDP is not restart-deterministic: its first step after
    # construction sums the gradients of the ranks in another order than its later steps
    # (measured: a job resumed at step 8 differs in the last bit from one that ran
    # through, while restoring step 8 itself is bit-exact). "manual" averages with one
    # all_reduce per parameter, the same way at every step.
    p.add_argument("--allreduce", choices=["ddp", "manual"], default="ddp")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{args.dir}/rendezvous-{os.environ['RUN_ID']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=args.timeout),
    )
    if args.unreadable_rank == rank:
        deny_reads_below(os.path.realpath(args.dir))
    result: dict[str, Any] = {"rank": rank}
    try:
        result.update(train(args, rank, world, result))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(args.dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    # After a failed gloo collective a process can abort in its exit handlers.
    os._exit(0)


def deny_reads_below(directory: str) -> None:
    """Make every ``os.open`` of a path in ``directory`` fail with EACCES."""
    import errno

    real_open = os.open

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        dir_fd = kwargs.get("dir_fd")
        where = os.path.realpath(os.fspath(path)) if dir_fd is None else directory
        if where == directory or where.startswith(directory + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    os.open = guarded_open  # type: ignore[assignment]


class KillMidSave:
    """Storage that SIGKILLs (or SIGSTOPs) this process once it wrote its first data file
    of save K."""

    def __init__(self, inner: Any, at_save: int, signum: int = signal.SIGKILL) -> None:
        self._inner, self._at_save, self.saves = inner, at_save, 0
        self._signum = signum

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create(self, path: str) -> Any:
        f = self._inner.create(path)
        if self.saves == self._at_save and path.endswith(".safetensors"):
            outer_close = f.close

            def close() -> None:
                outer_close()
                os.kill(os.getpid(), self._signum)

            f.close = close
        return f


def train(
    args: argparse.Namespace, rank: int, world: int, report: dict[str, Any]
) -> dict[str, Any]:
    """Train and save; what ``main`` writes as the result. ``report`` gets ``save_secs``
    as each save ends, so that it is written even when the save raised."""
    import trainhooks as th
    from trainhooks.checkpoint.distributed.torch_group import TorchProcessGroup
    from trainhooks.checkpoint.storage import LocalStorage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    session = th.Session({"model": model, "optimizer": optimizer}, advance_global_step=False)
    killer = None
    storage = None
    if args.kill_rank == rank and args.kill_at_save is not None:
        signum = signal.SIGSTOP if args.hang else signal.SIGKILL
        killer = storage = KillMidSave(LocalStorage(), args.kill_at_save, signum)
    saver = th.Saver(
        max_to_keep=3,
        async_save=args.async_save,
        storage=storage,
        process_group=TorchProcessGroup(timeout_secs=args.timeout),
    )
    checkpoint_dir = args.checkpoint_dir or args.dir
    restored = saver.restore_latest(session, checkpoint_dir)
    start = session.global_step
    saves = 0
    for step in range(start + 1, args.steps + 1):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        if args.allreduce == "manual":
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
        session.global_step = step
        if step % args.save_every == 0:
            saves += 1
            if killer is not None:
                killer.saves = saves
            began = time.monotonic()
            try:
                saver.save(session, os.path.join(checkpoint_dir, "model.ckpt"), global_step=step)
                if args.async_save:
                    saver.wait()
            finally:
                report["save_secs"] = time.monotonic() - began
            if report["save_secs"] > args.timeout + 10:
                raise RuntimeError("a save took longer than the checkpoint timeout")
    saver.close()
    digest = hashlib.sha256()
    for t in model.state_dict().values():
        digest.update(t.numpy().tobytes())
    for state in optimizer.state_dict()["state"].values():
        for t in state.values():
            digest.update(t.numpy().tobytes() if torch.is_tensor(t) else repr(t).encode())
    return {
        "restored": restored,
        "start": start,
        "end": session.global_step,
        "digest": digest.hexdigest(),
    }


if __name__ == "__main__":
    sys.exit(main())
