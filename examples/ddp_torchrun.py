#!/usr/bin/env python3
"""DDP on several processes with MonitoredTrainingSession: every rank writes, one commit.

    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --dir /tmp/ddp-run
    torchrun --standalone --nproc-per-node 2 examples/ddp_torchrun.py --dir /tmp/ddp-run --steps 40

Run it twice: the second run resumes where the first stopped. Every rank runs this same
program with the same directory and the same state. ``master="env://"`` lets the session
initialize torch.distributed from what torchrun set; rank 0 is the chief: it chooses the
checkpoint every rank restores and commits each checkpoint that every rank wrote part of.
Each rank's random generators (its dropout masks here) are saved for that rank with
``th.PerRank``. SIGTERM to any one rank (``kill -TERM <pid>``) stops every rank at the
same step, with one final checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

import trainhooks as th


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dir", required=True, help="the checkpoint directory (the same on every rank)")
    p.add_argument("--steps", type=int, default=20, help="train up to this global step")
    p.add_argument("--save-every", type=int, default=5, help="save every this many steps")
    args = p.parse_args()
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(message)s")
    torch.set_num_threads(1)

    torch.manual_seed(0)  # every replica starts from the same weights
    model = torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1 + rank)  # each rank its own dropout masks, saved per rank below
    state = {"model": model, "optimizer": optimizer, "rng": th.PerRank(th.RNGState())}

    with th.MonitoredTrainingSession(
        master="env://",  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        checkpoint_dir=args.dir,
        state=state,
        save_checkpoint_steps=args.save_every,
        hooks=[th.StopAtStepHook(last_step=args.steps)],
        log_step_count_steps=None,
    ) as sess:
        # Wrapped after the session restored the weights (DDP broadcasts rank 0's).
        ddp = torch.nn.parallel.DistributedDataParallel(model)

        def train_step() -> dict[str, float]:
            g = torch.Generator().manual_seed(sess.global_step * 1000 + rank)  # this batch
            x = torch.randn(16, 32, generator=g)
            loss = torch.nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return {"loss": loss.item()}

        while not sess.should_stop():
            result = sess.run(train_step)
            if rank == 0 and sess.global_step % args.save_every == 0:
                print(f"step {sess.global_step}: loss {result['loss']:.4f}", flush=True)
    if rank == 0:
        print(f"stopped at step {sess.global_step}", flush=True)


if __name__ == "__main__":
    main()
