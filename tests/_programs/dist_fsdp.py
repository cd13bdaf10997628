"""One rank of a gloo job with an FSDP2 (``fully_shard``) model and AdamW, saved sharded.

Modes (all ranks run the same one):

* ``train``: train ``--steps`` steps from the latest checkpoint in DIR (or from scratch),
  saving every ``--save-every`` steps with ``Saver(process_group=TorchProcessGroup())``;
  ``--kill-rank R --kill-at-save K`` SIGKILLs rank R after it wrote its first data file
  of its K-th save.
* ``restore``: build the model on this job's mesh (any world size), restore the latest
  checkpoint, and report the full parameters and optimizer moments (``full_tensor()``).
* ``plain``: one process, no process group: restore into a plain (unsharded) model.

With ``--mesh2d`` the model is sharded over a 2-D mesh (replicate x shard, HSDP).

Writes ``DIR/result-<rank>.json``: the step restored and reached, and the full tensors
as lists of float32 bit patterns (compared bit for bit by the test), or the error.

Run (per rank): ``RANK=0 WORLD_SIZE=2 RUN_ID=x python dist_fsdp.py DIR train --steps 4``.
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

sys.path.insert(0, os.path.dirname(__file__))
from dist_train import KillMidSave


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("mode", choices=["train", "restore", "plain"])
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--async-save", action="store_true")
    p.add_argument("--mesh2d", action="store_true")
    p.add_argument("--kill-rank", type=int, default=None)
    p.add_argument("--kill-at-save", type=int, default=None)
    args = p.parse_args()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    result: dict[str, Any] = {"rank": rank}
    try:
        if args.mode == "plain":
            result.update(plain(args))
        else:
            import torch.distributed as dist

            dist.init_process_group(
                "gloo",
                init_method=f"file://{args.dir}/rendezvous-{os.environ['RUN_ID']}",
                rank=rank,
                world_size=world,
                timeout=timedelta(seconds=20),
            )
            result.update(job(args, rank, world))
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    with open(os.path.join(args.dir, f"result-{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # Sizes that no world size of 2-4 divides evenly: uneven (and empty) shards.
    return torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def bits(t: torch.Tensor) -> list[int]:
    return t.detach().contiguous().view(torch.int32).reshape(-1).tolist()


def job(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import trainhooks as th
    from trainhooks.checkpoint.distributed.torch_group import TorchProcessGroup
    from trainhooks.checkpoint.storage import LocalStorage

    if args.mesh2d:
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    session = th.Session({"model": model, "optimizer": optimizer}, advance_global_step=False)
    killer = None
    if args.kill_rank == rank and args.kill_at_save is not None:
        killer = KillMidSave(LocalStorage(), args.kill_at_save)
    saver = th.Saver(
        max_to_keep=5,
        async_save=args.async_save,
        storage=killer,
        process_group=TorchProcessGroup(timeout_secs=20),
    )
    restored = saver.restore_latest(session, args.dir)
    start = session.global_step
    saves = 0
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.global_step = step
        if step % args.save_every == 0:
            saves += 1
            if killer is not None:
                killer.saves = saves
            saver.save(session, os.path.join(args.dir, "model.ckpt"), global_step=step)
            if args.async_save:
                saver.wait()
    saver.close()
    full = {k: bits(v.full_tensor()) for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            full[f"opt/{i}/{k}"] = bits(v.full_tensor() if hasattr(v, "full_tensor") else v)
    return {"restored": restored, "start": start, "end": session.global_step, "full": full}


def plain(args: argparse.Namespace) -> dict[str, Any]:
    import trainhooks as th

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    session = th.Session({"model": model, "optimizer": optimizer}, advance_global_step=False)
    saver = th.Saver()
    restored = saver.restore_latest(session, args.dir)
    start = session.global_step
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        session.global_step = step
    full = {k: bits(v) for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            full[f"opt/{i}/{k}"] = bits(v)
    return {"restored": restored, "start": start, "end": session.global_step, "full": full}


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.exit(main())
