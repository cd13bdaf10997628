#!/usr/bin/env python3
"""Checkpointing in a torch.distributed (gloo, CPU) job: trainhooks against DCP.

    python benchmarks/bench_distributed.py --mib 64 --world-sizes 1,2,4 --repeat 3
    python benchmarks/bench_distributed.py --mib 64 --state tensors --dir /tmp

Each world size is one job: the parent starts ``N`` ranks of this script with
``subprocess`` (``--worker``; ``RANK``/``WORLD_SIZE`` in the environment, a ``file://``
rendezvous, no torchrun) and aggregates the JSON file each rank writes. Every rank holds
the same state, a data-parallel replica:

* ``--state model`` (default): a ``DistributedDataParallel`` stack of ``Linear(1024,
  1024)`` layers with its Adam state after one training step (parameters + ``exp_avg``
  + ``exp_avg_sq``, about ``--mib`` MiB in all);
* ``--state tensors``: a dict of float32 tensors of about ``--mib`` MiB, 16 tensors.

In the same processes, on the same state, four methods run in rounds, round ``r``
starting at the ``r``-th method (rotating order):

* ``trainhooks``: ``Saver(max_to_keep=1, process_group=TorchProcessGroup(timeout_secs=
  120))``; ``save(session, f"{dir}/model.ckpt", global_step=k)`` on every rank, then
  ``restore_latest(session, dir)`` cold and warm (into the existing tensors);
* ``dcp``: ``torch.distributed.checkpoint.save(state_dict, checkpoint_id=dir)`` and
  ``dcp.load(state_dict, checkpoint_id=dir)`` (in place) cold and warm; the state dict is
  ``{"model": model.state_dict(), "optim": {name: tensor}}``, the optimizer's state tensors
  themselves;
* ``trainhooks_async``: ``Saver(..., async_save=True)``: stall = until ``save()`` returns,
  total = until ``wait()`` returns (from the start of ``save()``);
* ``dcp_async``: ``dcp.async_save(...)``: stall = until it returns, total = until its
  future's ``.result()`` returns.

Every timed operation starts after a barrier; a cell's time for one round is the
slowest rank's (the job waits for it). Before a cold restore rank 0 drops the method's
files from the page cache (``fsync`` + ``posix_fadvise(DONTNEED)`` on each, after a
barrier). Before each restore every state tensor is overwritten (zeros, then ``-1`` in
the first element before the warm one), and after it every rank checks that the state's
tensors (asked of the model and optimizer again) hold the saved values, and notes which
of them the restore replaced by new tensors instead of filling (an optimizer's
``load_state_dict`` does: the values arrive, but in new storage). Prints min / median of the rounds per world size and method and
writes the whole result to ``benchmarks/results/distributed-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

from bench_restore import evict  # the benchmarks run as scripts from this folder

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 2**20
METHODS = ("trainhooks", "dcp", "trainhooks_async", "dcp_async")
COLUMNS = ("save", "cold", "warm", "stall", "total")


# ---- one rank -------------------------------------------------------------------------


def build_state(kind: str, mib: float) -> dict[str, Any]:
    """What the session holds: a DDP-trained model and its Adam state, or plain tensors."""
    import torch

    torch.manual_seed(0)  # the same replica on every rank
    if kind == "tensors":
        n = int(mib * MIB) // 4 // 16
        return {f"layer{i:02d}/weight": torch.rand(n) for i in range(16)}
    width = 1024
    per_layer = (width * width + width) * 4 * 3  # weight + bias, and Adam's two moments
    layers = max(1, round(mib * MIB / per_layer))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3)
    rank = int(os.environ["RANK"])
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().mean().backward()  # gradients averaged: the replicas stay identical
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def tensors_of(state: dict[str, Any]) -> dict[str, Any]:
    """{name: tensor} of every tensor the state holds now (an optimizer's state tensors
    themselves: a ``load_state_dict`` replaces them, so this is asked again each time)."""
    import torch

    if "optimizer" not in state:
        return dict(state)
    model, optimizer = state["model"], state["optimizer"]
    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                flat[f"optim.{names[id(p)]}.{k}"] = v
    return flat


def dcp_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """DCP's state dict: ``model.state_dict()`` (tensors sharing the parameters' storage)
    and the optimizer's current state tensors, by name."""
    flat = tensors_of(state)
    if "optimizer" not in state:
        return {"model": flat}
    optim = {k[len("optim.") :]: v for k, v in flat.items() if k.startswith("optim.")}
    return {"model": state["model"].state_dict(), "optim": optim}


class Rank:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import torch.distributed as dist

        import trainhooks as th

        self.torch, self.dist, self.th = torch, dist, th
        self.args = args
        self.rank = dist.get_rank()
        self.state = build_state(args.state, args.mib)
        self.flat = tensors_of(self.state)
        self.expected = {k: v.detach().clone() for k, v in self.flat.items()}
        self.ptrs: dict[str, int] = {}
        self.session = th.Session(self.state, advance_global_step=False)
        self.dirs = {m: os.path.join(args.dir, m) for m in METHODS}
        if self.rank == 0:
            for d in self.dirs.values():
                os.makedirs(d, exist_ok=True)
        self.savers = {
            "trainhooks": th.Saver(
                max_to_keep=1, process_group=th.TorchProcessGroup(timeout_secs=120)
            ),
            "trainhooks_async": th.Saver(
                max_to_keep=1,
                async_save=True,
                process_group=th.TorchProcessGroup(timeout_secs=120),
            ),
        }
        self.step = 0
        self.times: dict[str, dict[str, list[float]]] = {
            m: {c: [] for c in COLUMNS} for m in METHODS
        }
        self.storage_changed: list[str] = []

    def barrier(self) -> None:
        self.dist.barrier()

    def timed(self, fn: Any) -> float:
        self.barrier()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def clobber(self, first_only: bool = False) -> None:
        """Overwrite every tensor the state holds now, and note where each one lives."""
        flat = tensors_of(self.state)
        with self.torch.no_grad():
            for v in flat.values():
                if first_only:
                    v.view(-1)[:1] = -1
                else:
                    v.zero_()
        self.ptrs = {k: v.data_ptr() for k, v in flat.items()}

    def check(self, method: str, what: str) -> None:
        """The saved values are back in the state; note tensors the restore replaced."""
        current = tensors_of(self.state)
        if current.keys() != self.expected.keys():
            raise AssertionError(f"{method} {what}: the state's entries changed")
        for k, v in current.items():
            if not self.torch.equal(v, self.expected[k]):
                raise AssertionError(f"rank {self.rank}: {method} {what}: {k} not restored")
            if v.data_ptr() != self.ptrs[k]:
                self.storage_changed.append(f"{method} {what}: {k}")

    def prepare_dcp(self, method: str) -> None:
        self.barrier()
        if self.rank == 0:
            shutil.rmtree(self.dirs[method], ignore_errors=True)
        self.barrier()

    def evict_all(self, method: str) -> None:
        self.barrier()
        if self.rank == 0:
            evict(self.dirs[method])
        self.barrier()

    def run_sync(self, method: str) -> None:
        import torch.distributed.checkpoint as dcp

        d = self.dirs[method]
        t = self.times[method]
        if method == "trainhooks":
            saver = self.savers[method]
            self.step += 1
            self.session.global_step = self.step

            def save() -> None:
                saver.save(self.session, f"{d}/model.ckpt", global_step=self.step)

            def restore() -> None:
                got = saver.restore_latest(self.session, d)
                if got != f"{d}/model.ckpt-{self.step}":
                    raise AssertionError(f"restored {got}")

        else:
            self.prepare_dcp(method)

            def save() -> None:
                dcp.save(dcp_state_dict(self.state), checkpoint_id=d)

            def restore() -> None:
                dcp.load(dcp_state_dict(self.state), checkpoint_id=d)

        t["save"].append(self.timed(save))
        self.clobber()
        self.evict_all(method)
        with self.torch.no_grad():
            t["cold"].append(self.timed(restore))
        self.check(method, "cold")
        self.clobber(first_only=True)
        with self.torch.no_grad():
            t["warm"].append(self.timed(restore))
        self.check(method, "warm")

    def run_async(self, method: str) -> None:
        import torch.distributed.checkpoint as dcp

        d = self.dirs[method]
        t = self.times[method]
        if method == "trainhooks_async":
            saver = self.savers[method]
            self.step += 1
            self.session.global_step = self.step
            self.barrier()
            start = time.perf_counter()
            saver.save(self.session, f"{d}/model.ckpt", global_step=self.step)
            stall = time.perf_counter() - start
            saver.wait()
        else:
            self.prepare_dcp(method)
            self.barrier()
            start = time.perf_counter()
            future = dcp.async_save(dcp_state_dict(self.state), checkpoint_id=d)
            stall = time.perf_counter() - start
            future.result()
        total = time.perf_counter() - start
        t["stall"].append(stall)
        t["total"].append(total)

    def rounds(self) -> None:
        warnings_off()
        for r in range(self.args.repeat):
            order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
            for m in order:
                if m.endswith("_async"):
                    self.run_async(m)
                else:
                    self.run_sync(m)
        for saver in self.savers.values():
            saver.close()


def warnings_off() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def worker(args: argparse.Namespace) -> int:

    import torch

    torch.set_num_threads(1)
    rank = join_job(args.dir)
    out: dict[str, Any] = {"rank": rank}
    try:
        job = Rank(args)
        job.rounds()
        out.update(
            times=job.times,
            bytes=sum(v.numel() * v.element_size() for v in job.expected.values()),
            tensors=len(job.expected),
            storage_changed=job.storage_changed,
        )
    except Exception as e:  # the parent reports it
        import traceback

        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    with open(os.path.join(args.dir, f"result-{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)  # a failed gloo collective can abort in the exit handlers


# ---- the parent ------------------------------------------------------------------------


def run_ranks(cmd: list[str], world: int, directory: str, timeout: float) -> list[dict[str, Any]]:
    """Start ``cmd`` once per rank of a job of ``world`` and return every rank's result.

    Each rank gets ``RANK``, ``WORLD_SIZE``, a ``RUN_ID`` and ``src/`` on its path, and
    writes ``<directory>/result-<rank>.json``; a rank that wrote none, or wrote an error,
    fails the job with every rank's message.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", RUN_ID=uuid.uuid4().hex, WORLD_SIZE=str(world))
    src = os.path.join(ROOT, "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(world)]
    for p in procs:
        p.wait(timeout=timeout)
    ranks = []
    for r in range(world):
        path = os.path.join(directory, f"result-{r}.json")
        if not os.path.exists(path):
            raise RuntimeError(f"world {world}: rank {r} wrote no result")
        with open(path) as f:
            ranks.append(json.load(f))
    errors = [f"rank {x['rank']}: {x['error']}\n{x['traceback']}" for x in ranks if "error" in x]
    if errors:
        raise RuntimeError(f"world {world}:\n" + "\n".join(errors))
    return ranks


def join_job(directory: str) -> int:
    """In a rank started by :func:`run_ranks`: join the gloo job; returns this rank."""
    from datetime import timedelta

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory}/rendezvous-{os.environ['RUN_ID']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    return rank


def run_world(args: argparse.Namespace, world: int) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix=f"bench-dist-{world}-", dir=args.dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--dir", d]
    cmd += ["--mib", str(args.mib), "--state", args.state, "--repeat", str(args.repeat)]
    started = time.perf_counter()
    try:
        ranks = run_ranks(cmd, world, d, args.timeout)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    # One round's time is the slowest rank's.
    times = {
        m: {
            c: [
                max(x["times"][m][c][i] for x in ranks) for i in range(len(ranks[0]["times"][m][c]))
            ]
            for c in COLUMNS
        }
        for m in METHODS
    }
    summary = {
        m: {c: {"min": min(v), "median": statistics.median(v)} for c, v in cols.items() if v}
        for m, cols in times.items()
    }
    return {
        "world_size": world,
        "bytes": ranks[0]["bytes"],
        "tensors": ranks[0]["tensors"],
        "seconds": time.perf_counter() - started,
        "times": times,
        "per_rank": [x["times"] for x in ranks],
        "storage_changed": sorted({s for x in ranks for s in x["storage_changed"]}),
        "summary": summary,
    }


def table(results: list[dict[str, Any]], repeat: int) -> list[str]:
    lines = [
        f"min / median of {repeat} rounds, seconds (each round: the slowest rank)",
        "",
        "| world | method | save | restore cold | restore warm | async stall | async total |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(s: dict[str, Any], method: str, col: str) -> str:
        v = s[method].get(col)
        return f"{v['min']:.3f} / {v['median']:.3f}" if v else ""

    for res in results:
        s = res["summary"]
        for i, (name, sync, bg) in enumerate(
            (("trainhooks", "trainhooks", "trainhooks_async"), ("DCP", "dcp", "dcp_async"))
        ):
            cells = [cell(s, sync, c) for c in ("save", "cold", "warm")]
            cells += [cell(s, bg, c) for c in ("stall", "total")]
            world = str(res["world_size"]) if i == 0 else ""
            lines.append(f"| {world} | {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=float, default=64, help="size of the state on each rank (MiB)")
    p.add_argument("--state", choices=("model", "tensors"), default="model")
    p.add_argument("--world-sizes", default="1,2,4", help="comma-separated")
    p.add_argument("--repeat", type=int, default=3, help="rounds; min and median are shown")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per world size")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results = []
    load_before = os.getloadavg()
    for world in (int(w) for w in args.world_sizes.split(",") if w):
        print(f"world size {world} ...", file=sys.stderr, flush=True)
        results.append(run_world(args, world))
    load_after = os.getloadavg()
    out = {
        "benchmark": "bench_distributed",
        "state": args.state,
        "mib": args.mib,
        "repeat": args.repeat,
        "load_before": load_before,
        "load_after": load_after,
        "cpus": os.cpu_count(),
        "results": results,
    }
    first = results[0] if results else None
    if first:
        print(
            f"state: {args.state}, {first['bytes'] / MIB:.1f} MiB in {first['tensors']} "
            f"tensors on every rank; load average before {load_before[0]:.2f}, "
            f"after {load_after[0]:.2f}"
        )
    print("\n".join(table(results, args.repeat)))
    for res in results:
        replaced: dict[str, int] = {}
        for entry in res["storage_changed"]:
            where = entry.split(":")[0]
            replaced[where] = replaced.get(where, 0) + 1
        for where, n in replaced.items():
            print(
                f"world {res['world_size']}: {where} restore put {n} of {res['tensors']} "
                "tensors in new storage (the values are right; the old tensors were dropped)"
            )
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", time.strftime("distributed-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
