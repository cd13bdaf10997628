#!/usr/bin/env python3
"""DDP on several processes, every rank writing part of each checkpoint, one commit.

    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --dir /tmp/ddp-run
    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --dir /tmp/ddp-run --steps 40

Run it twice: the second run resumes where the first stopped. Every rank passes the same
directory and the same state, and calls ``Saver.save`` and ``Saver.restore_latest`` at
the same step: each rank writes about 1/N of the bytes, rank 0 commits them as one
checkpoint and keeps the state file; a rank that dies mid-save means no commit and an
error on every other rank within the checkpoint timeout.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist

import trainhooks as th


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", required=True, help="the checkpoint directory (the same on every rank)")
    p.add_argument("--steps", type=int, default=20, help="train up to this global step")
    p.add_argument("--save-every", type=int, default=5, help="save every this many steps")
    args = p.parse_args()
    logging.basicConfig(
        level=logging.INFO, format=f"[rank {os.environ.get('RANK', 0)}] %(message)s"
    )

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank = dist.get_rank()
    torch.manual_seed(0)  # every replica starts from the same weights
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-3)

    # The state of the replica; the saver's process group makes save and restore collective.
    session = th.Session({"model": model, "optimizer": optimizer}, advance_global_step=False)
    saver = th.Saver(max_to_keep=3, process_group=th.TorchProcessGroup(timeout_secs=120))
    os.makedirs(args.dir, exist_ok=True)
    saver.restore_latest(session, args.dir)  # the checkpoint rank 0 chose, on every rank

    for step in range(session.global_step + 1, args.steps + 1):
        g = torch.Generator().manual_seed(step * 1000 + rank)  # this rank's batch of this step
        x = torch.randn(16, 32, generator=g)
        loss = torch.nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.global_step = step
        if step % args.save_every == 0 or step == args.steps:
            saver.save(session, os.path.join(args.dir, "model.ckpt"), global_step=step)
            if rank == 0:
                print(f"step {step}: loss {loss.item():.4f}, saved", flush=True)
    saver.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
