#!/usr/bin/env python3
"""Sharded (FSDP2) checkpoints in torch.distributed (gloo, CPU) jobs: trainhooks against DCP.

    python benchmarks/bench_sharded.py --mib 64 --world-sizes 2,4 --repeat 5

Every job builds the same state on its own mesh: a stack of ``Linear(1024, 1024)`` layers,
each and the whole under ``fully_shard`` (FSDP2), with ``torch.optim.AdamW`` after one
training step, so that parameters and both moments are DTensors sharded over the job's
ranks (``--mib`` is the whole state's size, parameters and moments, summed over ranks).
The parent starts ``N`` ranks of this script per job with ``subprocess`` (``--worker``;
``RANK``/``WORLD_SIZE`` in the environment, a ``file://`` rendezvous, no torchrun) and
aggregates the JSON file each rank writes. The jobs, in this order:

* ``save`` at each world size ``N``: in rounds, round ``r`` starting at the ``r``-th
  method (rotating order), each method saves (timed), then restores at the same world
  size cold and warm (``--warmup`` rounds first, not counted: a process's first save and
  restore import and set up what later ones reuse); the last round's checkpoints stay for the next jobs, with the
  saved values (every tensor whole, ``full_tensor()``, in a NumPy ``.npz``);
* ``reshard`` ``N -> M`` for each pair of world sizes: a job of ``M`` ranks restores the
  checkpoints the ``N``-rank job left, cold and warm, in rounds as above.

The methods:

* ``trainhooks``: ``Saver(max_to_keep=1, process_group=TorchProcessGroup(timeout_secs=
  120))`` on ``Session({"model": model, "optimizer": optimizer})``;
  ``save(session, f"{dir}/model.ckpt", global_step=k)`` and ``restore_latest(session,
  dir)`` on every rank;
* ``dcp``: as DCP's users do (``torch.distributed.checkpoint.state_dict``): save is
  ``get_state_dict(model, optimizer)`` + ``dcp.save({"model": ..., "optim": ...},
  checkpoint_id=dir)``; restore is ``get_state_dict`` + ``dcp.load`` of that dict +
  ``set_state_dict(model, optimizer, ...)``.

Every timed operation starts after a barrier; a cell's time for one round is the slowest
rank's. Before a cold restore rank 0 drops the method's files from the page cache
(``fsync`` + ``posix_fadvise(DONTNEED)`` on each, ``bench_restore.evict``, after a
barrier). Before each restore every local tensor of the model's and optimizer's DTensors
(and the optimizer's ``step``) is zeroed; after it every rank asks the model and
optimizer for their tensors again and checks that each DTensor's local tensor equals its
region of the saved whole tensor, bit for bit. Prints min / median of the rounds and
writes the whole result to ``benchmarks/results/sharded-<time>.json``.
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
from typing import Any

from bench_distributed import join_job, run_ranks  # the benchmarks run as scripts from this folder
from bench_restore import evict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 2**20
METHODS = ("trainhooks", "dcp")
WIDTH = 1024


# ---- one rank -------------------------------------------------------------------------


def build_state(mib: float) -> tuple[Any, Any]:
    """An FSDP2 model on this job's mesh and its AdamW after one step."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same model on every rank and in every job
    per_layer = (WIDTH * WIDTH + WIDTH) * 4 * 3  # weight + bias, and AdamW's two moments
    layers = max(1, round(mib * MIB / per_layer))
    model = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)))
    mesh = init_device_mesh("cpu", (int(os.environ["WORLD_SIZE"]),))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def tensors_of(model: Any, optimizer: Any) -> dict[str, Any]:
    """{name: tensor} of every tensor the state holds now (DTensors and the optimizer's
    plain ``step``); asked again each time, as a restore may replace them."""
    import torch

    flat = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if torch.is_tensor(v):
                flat[f"optim.{names[id(p)]}.{k}"] = v
    return flat


def local_of(value: Any) -> Any:
    return value.to_local() if hasattr(value, "to_local") else value


def region(value: Any) -> tuple[slice, ...]:
    """The slices of the whole tensor that DTensor ``value``'s local tensor holds."""
    if not hasattr(value, "__create_chunk_list__"):
        return tuple(slice(None) for _ in value.shape)
    (chunk,) = value.__create_chunk_list__()
    return tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))


class Rank:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        import torch.distributed as dist

        import trainhooks as th

        self.torch, self.dist, self.th = torch, dist, th
        self.args = args
        self.rank = dist.get_rank()
        self.model, self.optimizer = build_state(args.mib)
        self.session = th.Session(
            {"model": self.model, "optimizer": self.optimizer}, advance_global_step=False
        )
        self.saver = th.Saver(max_to_keep=1, process_group=th.TorchProcessGroup(timeout_secs=120))
        self.times: dict[str, dict[str, list[float]]] = {
            m: {c: [] for c in ("save", "cold", "warm")} for m in METHODS
        }
        self.expected: dict[str, Any] = {}

    def barrier(self) -> None:
        self.dist.barrier()

    def timed(self, fn: Any) -> float:
        self.barrier()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def whole(self) -> dict[str, Any]:
        """Every tensor whole (a collective for DTensors), as NumPy arrays."""
        return {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
            for k, v in tensors_of(self.model, self.optimizer).items()
        }

    def clobber(self) -> None:
        with self.torch.no_grad():
            for v in tensors_of(self.model, self.optimizer).values():
                local_of(v).zero_()

    def check(self, method: str, what: str) -> None:
        """Every local tensor holds its region of the saved whole tensor, bit for bit."""
        current = tensors_of(self.model, self.optimizer)
        if current.keys() != self.expected.keys():
            raise AssertionError(f"{method} {what}: the state's entries changed")
        for k, v in current.items():
            got = local_of(v).detach().numpy()
            want = self.expected[k][region(v)]
            if got.shape != want.shape or got.tobytes() != want.tobytes():
                raise AssertionError(f"rank {self.rank}: {method} {what}: {k} not restored")

    def evict_all(self, directory: str) -> None:
        self.barrier()
        if self.rank == 0:
            evict(directory)
        self.barrier()

    def dcp_state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def dcp_save(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.dcp_state_dict(), checkpoint_id=directory)

    def dcp_restore(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = self.dcp_state_dict()
        dcp.load(sd, checkpoint_id=directory)
        set_state_dict(
            self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
        )

    def restore(self, method: str, directory: str, step: int) -> None:
        """Restore cold (after eviction) and warm, each checked."""
        if method == "trainhooks":

            def fn() -> None:
                got = self.saver.restore_latest(self.session, directory)
                if got != f"{directory}/model.ckpt-{step}":
                    raise AssertionError(f"restored {got}")

        else:

            def fn() -> None:
                self.dcp_restore(directory)

        t = self.times[method]
        self.clobber()
        self.evict_all(directory)
        with self.torch.no_grad():
            t["cold"].append(self.timed(fn))
        self.check(method, "cold")
        self.clobber()
        with self.torch.no_grad():
            t["warm"].append(self.timed(fn))
        self.check(method, "warm")

    def save_rounds(self, out: str) -> None:
        """Save and restore at this world size; leaves the last round's checkpoints and
        the saved values under ``out``."""
        whole = self.whole()
        self.expected = whole
        if self.rank == 0:
            for m in METHODS:
                os.makedirs(os.path.join(out, m), exist_ok=True)
            self.import_np().savez(os.path.join(out, "expected.npz"), **whole)
        for r in range(self.args.warmup + self.args.repeat):
            step = r + 1
            self.session.global_step = step
            for m in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
                d = os.path.join(out, m)
                if m == "trainhooks":
                    self.times[m]["save"].append(
                        self.timed(
                            lambda d=d, step=step: self.saver.save(
                                self.session, f"{d}/model.ckpt", global_step=step
                            )
                        )
                    )
                else:
                    self.barrier()
                    if self.rank == 0:
                        shutil.rmtree(d, ignore_errors=True)
                    self.barrier()
                    self.times[m]["save"].append(self.timed(lambda d=d: self.dcp_save(d)))
                self.restore(m, d, step)
        self.saver.close()

    def reshard_rounds(self, source: str, steps: int) -> None:
        """Restore the checkpoints another job left under ``source``."""
        np = self.import_np()
        with np.load(os.path.join(source, "expected.npz"), allow_pickle=False) as f:
            self.expected = {k: f[k] for k in f.files}
        for r in range(self.args.warmup + self.args.repeat):
            for m in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
                self.restore(m, os.path.join(source, m), steps)
        self.saver.close()

    @staticmethod
    def import_np() -> Any:
        import numpy

        return numpy


def warnings_off() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


def worker(args: argparse.Namespace) -> int:

    import torch

    torch.set_num_threads(1)
    warnings_off()
    rank = join_job(args.rendezvous)
    out: dict[str, Any] = {"rank": rank}
    try:
        job = Rank(args)
        if args.source:
            job.reshard_rounds(args.source, args.warmup + args.repeat)
        else:
            job.save_rounds(args.out)
        out.update(
            times=job.times,
            bytes=sum(v.nbytes for v in job.expected.values()),
            local_bytes=sum(
                local_of(v).numel() * local_of(v).element_size()
                for v in tensors_of(job.model, job.optimizer).values()
            ),
            tensors=len(job.expected),
        )
    except Exception as e:  # the parent reports it
        import traceback

        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
    with open(os.path.join(args.rendezvous, f"result-{rank}.json"), "w") as f:
        json.dump(out, f)
    os._exit(0)  # a failed gloo collective can abort in the exit handlers


# ---- the parent ------------------------------------------------------------------------


def run_job(args: argparse.Namespace, world: int, extra: list[str]) -> dict[str, Any]:
    d = tempfile.mkdtemp(prefix=f"bench-sharded-{world}-", dir=args.dir)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--rendezvous", d]
    cmd += ["--mib", str(args.mib), "--repeat", str(args.repeat), "--warmup", str(args.warmup)]
    cmd += extra
    started = time.perf_counter()
    try:
        ranks = run_ranks(cmd, world, d, args.timeout)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    # One round's time is the slowest rank's; the warm-up rounds are left out.
    times = {
        m: {
            c: [max(x["times"][m][c][i] for x in ranks) for i in range(args.warmup, len(v))]
            for c, v in cols.items()
        }
        for m, cols in ranks[0]["times"].items()
    }
    return {
        "world_size": world,
        "bytes": ranks[0]["bytes"],
        "local_bytes": [x["local_bytes"] for x in ranks],
        "tensors": ranks[0]["tensors"],
        "seconds": time.perf_counter() - started,
        "times": times,
        "per_rank": [x["times"] for x in ranks],
        "summary": {
            m: {c: {"min": min(v), "median": statistics.median(v)} for c, v in cols.items() if v}
            for m, cols in times.items()
        },
    }


def table(rows: list[tuple[str, dict[str, Any]]], repeat: int) -> list[str]:
    lines = [
        f"min / median of {repeat} rounds, seconds (each round: the slowest rank); "
        "x DCP: trainhooks's minimum over DCP's",
        "",
        "| job | method | save | restore cold | restore warm | x DCP (save, cold, warm) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]

    def cell(s: dict[str, Any], col: str) -> str:
        v = s.get(col)
        return f"{v['min']:.3f} / {v['median']:.3f}" if v else ""

    for label, res in rows:
        s = res["summary"]
        for i, (name, m) in enumerate((("trainhooks", "trainhooks"), ("DCP", "dcp"))):
            cells = [cell(s[m], c) for c in ("save", "cold", "warm")]
            ratio = ""
            if m == "trainhooks":  # of the minimums
                ratio = ", ".join(
                    f"{s[m][c]['min'] / s['dcp'][c]['min']:.2f}"
                    for c in ("save", "cold", "warm")
                    if c in s[m]
                )
            lines.append(
                f"| {label if i == 0 else ''} | {name} | " + " | ".join([*cells, ratio]) + " |"
            )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mib", type=float, default=64, help="size of the whole state (MiB)")
    p.add_argument("--world-sizes", default="2,4", help="comma-separated")
    p.add_argument("--repeat", type=int, default=5, help="rounds; min and median are shown")
    p.add_argument("--warmup", type=int, default=1, help="rounds before those, not counted")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per job")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--rendezvous", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--source", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    worlds = [int(w) for w in args.world_sizes.split(",") if w]
    base = tempfile.mkdtemp(prefix="bench-sharded-", dir=args.dir)
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows: list[tuple[str, dict[str, Any]]] = []
    try:
        for world in worlds:
            print(f"save at {world} ...", file=sys.stderr, flush=True)
            out = os.path.join(base, f"saved-{world}")
            rows.append((f"{world} -> {world}", run_job(args, world, ["--out", out])))
        for saved in worlds:
            for world in worlds:
                if world == saved:
                    continue
                print(f"restore {saved} -> {world} ...", file=sys.stderr, flush=True)
                source = os.path.join(base, f"saved-{saved}")
                rows.append((f"{saved} -> {world}", run_job(args, world, ["--source", source])))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    load_after = os.getloadavg()
    first = rows[0][1]
    print(
        f"{started}: FSDP2 state of {first['bytes'] / MIB:.1f} MiB in {first['tensors']} "
        f"tensors (whole); load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    print("\n".join(table(rows, args.repeat)))
    result = {
        "benchmark": "bench_sharded",
        "started": started,
        "mib": args.mib,
        "repeat": args.repeat,
        "warmup": args.warmup,
        "load_before": load_before,
        "load_after": load_after,
        "cpus": os.cpu_count(),
        "jobs": [dict(res, job=label) for label, res in rows],
    }
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", time.strftime("sharded-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
