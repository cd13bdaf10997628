#!/usr/bin/env python3
"""Background checkpointing: training-thread stall, total time and training throughput.

One method per process (``benchmarks/run_all.py`` runs them all and prints the table)::

    python benchmarks/bench_async.py --method trainhooks_async --gib 1

Each method saves the same state (``bench_checkpoint.make_state``: ``--gib`` of float32
in ``--tensors`` tensors) ``--repeat`` times, each save durable (fsynced), and prints one
JSON line: per save the *stall* (how long the training thread is blocked: for a
synchronous save, the whole save) and the *total* (until the checkpoint is durable).
Dirty pages of the previous save are flushed (``os.sync``) before each one, untimed.

Methods:

* ``memcopy``: ``torch.clone`` and ``np.copy`` of the whole state: the least a
  consistent in-memory snapshot can cost (the stall goal is at most 2x this);
* ``floor``, ``torch``, ``safetensors``: ``bench_checkpoint``'s save closures (raw
  ``os.writev`` + fsync; ``torch.save``; ``safetensors.numpy.save_file``), fsynced;
* ``dcp_save``, ``dcp_async``: ``torch.distributed.checkpoint.save`` / ``async_save``
  in one process (a gloo group of world size 1 on a file store, no network);
* ``trainhooks_sync``, ``trainhooks_async``: ``Saver().save`` and
  ``Saver(async_save=True).save`` + ``wait``;
* ``throughput``: with ``torch.set_num_threads(1)``, a small MLP trains on the main
  thread; steps/s alone (before and after), then while a ``trainhooks_async`` save of
  the state runs. Each run also records how much CPU other processes used meanwhile
  (``others_cores``; on a shared machine a run above ~0.1 is disturbed) and the share
  of the save's time the training thread spent on a CPU (``loop_cpu``).

Ablations (for the README's table of what helps): ``--no-direct`` writes through the
page cache (``LocalStorage(direct_io=False)``), ``--no-idle`` runs the background
writer at normal priority.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import bench_checkpoint

METHODS = (
    "memcopy",
    "floor",
    "torch",
    "safetensors",
    "dcp_save",
    "dcp_async",
    "trainhooks_sync",
    "trainhooks_async",
    "throughput",
)


class Holder:
    """The StateHolder a Saver saves from."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.global_step = 0


def _timed_saves(
    repeat: int, save: Callable[[int], Callable[[], None] | None]
) -> list[dict[str, float]]:
    """Run ``save(i)`` ``repeat`` times; it returns None (done) or a callable that waits."""
    results = []
    for i in range(repeat):
        os.sync()
        start = time.perf_counter()
        waiter = save(i)
        stall = time.perf_counter() - start
        if waiter is not None:
            waiter()
        results.append({"stall_s": stall, "total_s": time.perf_counter() - start})
    return results


def memcopy(state: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    clone_s, npcopy_s = [], []
    for _ in range(args.repeat):
        start = time.perf_counter()
        copies = {k: t.clone() for k, t in tensors.items()}
        clone_s.append(time.perf_counter() - start)
        del copies
        start = time.perf_counter()
        arrays = {k: np.copy(v) for k, v in state.items()}
        npcopy_s.append(time.perf_counter() - start)
        del arrays
    return {"clone_s": clone_s, "np_copy_s": npcopy_s}


def bench_checkpoint_method(name: str) -> Callable[..., dict[str, Any]]:
    factory = {
        "floor": bench_checkpoint.floor,
        "torch": bench_checkpoint.torch_method,
        "safetensors": bench_checkpoint.safetensors_method,
    }[name]

    def run(state: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
        save, _restore = factory(state, args.workdir)

        def one(_: int) -> None:
            save()

        return {"saves": _timed_saves(args.repeat, one)}

    return run


def _dcp(state: dict[str, np.ndarray], args: argparse.Namespace, use_async: bool) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    warnings.simplefilter("ignore")
    store = dist.FileStore(os.path.join(args.workdir, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}

    def one(i: int) -> Callable[[], None] | None:
        checkpoint_id = os.path.join(args.workdir, f"dcp-{i}")
        if not use_async:
            dcp.save(tensors, checkpoint_id=checkpoint_id)
            return None
        future = dcp.async_save(tensors, checkpoint_id=checkpoint_id)
        return lambda: future.result()

    try:
        return {"saves": _timed_saves(args.repeat, one)}
    finally:
        dist.destroy_process_group()


def others_cpu_s() -> float:
    """CPU seconds used so far by the other live processes (kernel threads excluded)."""
    me, total = os.getpid(), 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[6]) & 0x00200000:  # PF_KTHREAD
            continue
        total += sum(int(v) for v in fields[11:15]) / tick  # own and reaped children's
    return total


def make_saver(args: argparse.Namespace, use_async: bool) -> Any:
    """A Saver as a user gets it, or with one of the ablations the flags ask for."""
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.checkpoint.storage import LocalStorage

    storage = LocalStorage(direct_io=not args.no_direct)
    priority = "normal" if args.no_idle else "idle"
    return Saver(async_save=use_async, max_to_keep=2, storage=storage, background_priority=priority)


def trainhooks_saves(
    state: dict[str, np.ndarray], args: argparse.Namespace, use_async: bool
) -> dict[str, Any]:
    holder = Holder(state)
    saver = make_saver(args, use_async)
    prefix = os.path.join(args.workdir, "model.ckpt")

    def one(i: int) -> Callable[[], None] | None:
        holder.global_step = i
        saver.save(holder, prefix, global_step=i)
        return saver.wait if use_async else None

    saves = _timed_saves(args.repeat, one)
    saver.close()
    return {"saves": saves}


def throughput(state: dict[str, np.ndarray], args: argparse.Namespace) -> dict[str, Any]:
    """Steps/s of a one-thread MLP loop, alone and while a background save runs."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 256), torch.randn(64, 256)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    def alone(seconds: float) -> float:
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            steps += 1
        return steps / (time.perf_counter() - start)

    for _ in range(50):
        step()
    holder = Holder({"big": state, "model": model, "opt": opt})
    saver = make_saver(args, use_async=True)
    prefix = os.path.join(args.workdir, "model.ckpt")
    runs = []
    for i in range(args.repeat):
        os.sync()
        before = alone(2.0)
        start = time.perf_counter()
        saver.save(holder, prefix, global_step=i)
        returned = time.perf_counter()
        others, loop_cpu = others_cpu_s(), time.thread_time()
        steps = 0
        while saver.pending is not None:
            step()
            steps += 1
        end = time.perf_counter()
        others, loop_cpu = others_cpu_s() - others, time.thread_time() - loop_cpu
        saver.wait()
        os.sync()
        after = alone(2.0)
        base = (before + after) / 2
        during = steps / (end - returned)
        with_stall = steps / (end - start)
        runs.append(
            {
                "alone_steps_per_s": base,
                "during_steps_per_s": during,
                "ratio": during / base,
                "ratio_with_stall": with_stall / base,
                "save_s": end - start,
                "stall_s": returned - start,
                "others_cores": others / (end - returned),
                "loop_cpu": loop_cpu / (end - returned),
            }
        )
    saver.close()
    return {"runs": runs}


def run(method: str, args: argparse.Namespace) -> dict[str, Any]:
    state = bench_checkpoint.make_state("large", args)
    runners: dict[str, Callable[[dict[str, np.ndarray], argparse.Namespace], dict[str, Any]]] = {
        "memcopy": memcopy,
        "floor": bench_checkpoint_method("floor"),
        "torch": bench_checkpoint_method("torch"),
        "safetensors": bench_checkpoint_method("safetensors"),
        "dcp_save": lambda s, a: _dcp(s, a, use_async=False),
        "dcp_async": lambda s, a: _dcp(s, a, use_async=True),
        "trainhooks_sync": lambda s, a: trainhooks_saves(s, a, use_async=False),
        "trainhooks_async": lambda s, a: trainhooks_saves(s, a, use_async=True),
        "throughput": throughput,
    }
    args.workdir = tempfile.mkdtemp(prefix="bench-async-", dir=args.dir)
    try:
        return {"method": method, **runners[method](state, args)}
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--gib", type=float, default=1.0, help="state size in GiB (float32)")
    p.add_argument("--tensors", type=int, default=100, help="tensors in the state")
    p.add_argument("--repeat", type=int, default=3, help="saves per method")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    p.add_argument("--no-direct", action="store_true", help="ablation: no O_DIRECT writes")
    p.add_argument("--no-idle", action="store_true", help="ablation: writer at normal priority")
    args = p.parse_args()
    print(json.dumps(run(args.method, args)))


if __name__ == "__main__":
    main()
