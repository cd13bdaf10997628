"""One rank of a gloo job training an FSDP2 model with ``MonitoredTrainingSession``.

The model and batches are ``dist_fsdp.py``'s (``fully_shard`` per layer and on the
whole, AdamW); the session is given ``state={"model": ..., "optimizer": ...}`` and no
process group: it forms the job by itself, restores the latest checkpoint in DIR
(resharded when the job's size differs from the saving job's), saves every
``--save-steps`` steps (every rank writes its shards, the chief commits) and stops at
``--steps``.

Writes ``DIR/result-<rank>.json``: the step restored and reached, the steps the
checkpoint state lists, and the full parameters and optimizer moments
(``full_tensor()``) as float32 bit patterns, or the error.

Run (per rank): ``RANK=0 WORLD_SIZE=2 RUN_ID=x python dist_fsdp_session.py DIR --steps 6``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dist_fsdp import batch, bits, make_model


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--timeout", type=float, default=30.0)
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
    result: dict[str, Any] = {"rank": rank}
    try:
        result.update(train(args, world))
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(args.dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # after a failed gloo collective a process can abort in its exit handlers


def train(args: argparse.Namespace, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import trainhooks as th

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def train_step() -> None:
        # The same global batch on every rank: FSDP averages the gradients, so a job of
        # any size takes the same steps (up to rounding).
        x, y = batch(sess.global_step + 1)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with th.MonitoredTrainingSession(
        checkpoint_dir=args.dir,
        state={"model": model, "optimizer": optimizer},
        hooks=[th.StopAtStepHook(last_step=args.steps)],
        save_checkpoint_steps=args.save_steps,
        log_step_count_steps=None,
        save_summaries_steps=None,
        max_wait_secs=args.timeout,
        checkpoint_timeout_secs=args.timeout,
    ) as session:
        sess = session
        start = sess.global_step
        while not sess.should_stop():
            sess.run(train_step)
    full = {k: bits(v.full_tensor()) for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            full[f"opt/{i}/{k}"] = bits(v.full_tensor() if hasattr(v, "full_tensor") else v)
    listed = th.get_checkpoint_state(args.dir)
    paths = listed.all_model_checkpoint_paths if listed is not None else []
    return {
        "start": start,
        "end": sess.global_step,
        "listed": [int(p.rsplit("-", 1)[1]) for p in paths],
        "full": full,
    }


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(main())
