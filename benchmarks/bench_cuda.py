"""CUDA state: save, background stall and restore, trainhooks against what a user picks instead.

    python benchmarks/bench_cuda.py                    # 1 GiB of float32 in 32 tensors on cuda:0
    python benchmarks/bench_cuda.py --mib 4096 --repeat 5
    python benchmarks/bench_cuda.py --device cpu --mib 64 --repeat 2   # checks the script itself

Without CUDA (and no ``--device cpu``) it prints why and exits 0: nothing in the project
needs a GPU. The state is ``--tensors`` float32 tensors on the device; every restore
ends with the saved values in those same tensors (the user's), on the device. One
process runs every method in rounds, round ``r`` starting at the ``r``-th method
(rotating order), after one untimed round of saves (first allocations: pinned buffers).
In each round each method:

1. **saves** synchronously (timed; durable: every file it wrote and its directory
   fsynced);
2. has its own files dropped from the page cache (``fsync`` +
   ``posix_fadvise(DONTNEED)``) and **restores cold**, then **warm** (timed, ending
   with ``torch.cuda.synchronize()``);
3. where it saves in the background, saves that way and measures the **stall**: from
   the call until the training loop's next in-place update of the state (``add_`` on
   every tensor, as an optimizer step) has run on the device. It counts what the host
   waits for and what the device waits for: trainhooks returns once its copies are
   queued and orders the device's stream after them; DCP's ``async_save`` (a
   ``DefaultStager`` with pinned memory, non-blocking copies and async staging) must
   have finished staging (``staging_completion``) before the state may change.
   ``total`` is until the checkpoint is committed.

Methods:

* ``floor``: every tensor copied into a reused pinned buffer (one ``synchronize``),
  one ``os.writev`` + fsync of the raw bytes; restored with ``os.preadv`` into pinned
  buffers and non-blocking copies back (no names, no checks, no format);
* ``trainhooks``: ``Saver.save`` / ``Saver.restore`` (every checksum verified before
  the state is touched); background: ``Saver(async_save=True)``;
* ``torch``: ``torch.save`` / ``torch.load(map_location="cpu", weights_only=True)`` +
  ``copy_``;
* ``safetensors``: ``save_file`` / ``load_file(device="cpu")`` + ``copy_``;
* ``dcp``: ``torch.distributed.checkpoint.save`` / ``load`` (in place); background:
  ``async_save`` as above.

Prints min / median of each column and one JSON line (``--json``).
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
from typing import Any

import torch

from bench_restore import evict, files_under, fsync_path, preadv_all, writev_all  # this directory

MIB = 2**20


def durable(directory: str) -> None:
    """fsync every file under ``directory`` and the directories themselves."""
    for path in files_under(directory):
        fsync_path(path)
    for root, _, _ in os.walk(directory):
        fsync_path(root)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Method:
    """One way to checkpoint: ``save``, ``restore``; ``background`` if it has one."""

    def __init__(self, state: dict[str, torch.Tensor], where: str) -> None:
        self.state = state
        self.where = where
        self.device = next(iter(state.values())).device
        os.makedirs(where, exist_ok=True)

    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def fill(self, loaded: dict[str, torch.Tensor]) -> None:
        """Copy what a library loaded into the state's own tensors (the user's)."""
        with torch.no_grad():
            for k, t in self.state.items():
                t.copy_(loaded[k])

    def prepare_background(self) -> None:
        """Untimed work before :meth:`background` (removing the last checkpoint)."""

    def background(self) -> tuple[Callable[[], None], Callable[[], None]] | None:
        """Start a background save; returns (wait until the state may change, wait
        until committed), or None when the method has no background save."""
        return None

    def close(self) -> None:
        """Release what the method holds (threads, buffers)."""


class Floor(Method):
    def __init__(self, state: dict[str, torch.Tensor], where: str) -> None:
        super().__init__(state, where)
        pin = self.device.type == "cuda"
        self.host = [torch.empty_like(t, device="cpu", pin_memory=pin) for t in state.values()]
        self.path = os.path.join(where, "raw.bin")

    def _views(self) -> list[memoryview]:
        return [h.numpy().data.cast("B") for h in self.host]

    def save(self) -> None:
        for h, t in zip(self.host, self.state.values()):
            h.copy_(t, non_blocking=True)
        sync(self.device)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            writev_all(fd, self._views())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(self.where)

    def restore(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            preadv_all(fd, self._views())
        finally:
            os.close(fd)
        with torch.no_grad():
            for h, t in zip(self.host, self.state.values()):
                t.copy_(h, non_blocking=True)
        sync(self.device)


class _Holder:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.global_step = 100


class Trainhooks(Method):
    def __init__(self, state: dict[str, torch.Tensor], where: str) -> None:
        super().__init__(state, where)
        from trainhooks.checkpoint.saver import Saver

        self.holder = _Holder(state)
        self.saver = Saver(max_to_keep=1)
        self.async_saver = Saver(max_to_keep=1, async_save=True)
        self.prefix = os.path.join(where, "model.ckpt")

    def save(self) -> None:
        self.saver.save(self.holder, self.prefix, global_step=100)

    def restore(self) -> None:
        self.saver.restore(self.holder, f"{self.prefix}-100")

    def background(self) -> tuple[Callable[[], None], Callable[[], None]]:
        self.async_saver.save(self.holder, self.prefix, global_step=100)
        return (lambda: None), self.async_saver.wait

    def close(self) -> None:
        self.async_saver.close()
        self.saver.close()


class TorchSave(Method):
    def __init__(self, state: dict[str, torch.Tensor], where: str) -> None:
        super().__init__(state, where)
        self.path = os.path.join(where, "model.pt")

    def save(self) -> None:
        torch.save(self.state, self.path)
        fsync_path(self.path)
        fsync_path(self.where)

    def restore(self) -> None:
        self.fill(torch.load(self.path, map_location="cpu", weights_only=True))


class Safetensors(Method):
    def __init__(self, state: dict[str, torch.Tensor], where: str) -> None:
        super().__init__(state, where)
        self.path = os.path.join(where, "model.safetensors")

    def save(self) -> None:
        from safetensors.torch import save_file

        save_file(self.state, self.path)
        fsync_path(self.path)
        fsync_path(self.where)

    def restore(self) -> None:
        from safetensors.torch import load_file

        self.fill(load_file(self.path, device="cpu"))  # maps lazily: the copy_ reads


class DCP(Method):
    def __init__(self, state: dict[str, torch.Tensor], where: str) -> None:
        super().__init__(state, where)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        # "torch.distributed is disabled ...": a single-process checkpoint, as meant
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        self.dcp = dcp
        self.dir = os.path.join(where, "dcp")
        pin = self.device.type == "cuda"
        self.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=pin,
                use_shared_memory=False,
                use_async_staging=True,
                use_non_blocking_copy=pin,
            )
        )

    def save(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dcp.save(self.state, checkpoint_id=self.dir)
        durable(self.dir)

    def restore(self) -> None:
        with torch.no_grad():
            self.dcp.load(self.state, checkpoint_id=self.dir)  # in place

    def prepare_background(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)  # not timed: trainhooks replaces its
        # last checkpoint on the writer thread, and DCP will not write into one

    def background(self) -> tuple[Callable[[], None], Callable[[], None]]:
        response = self.dcp.async_save(self.state, checkpoint_id=self.dir, async_stager=self.stager)
        from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

        if isinstance(response, AsyncSaveResponse):
            staged, uploaded = response.staging_completion, response.upload_completion
        else:  # a stager that stages synchronously: staged once async_save returned
            staged, uploaded = None, response

        def committed() -> None:
            uploaded.result()
            durable(self.dir)

        return (lambda: staged.result() if staged is not None else None), committed

    def close(self) -> None:
        self.stager.close()


FACTORIES: dict[str, Callable[[dict[str, torch.Tensor], str], Method]] = {
    "floor": Floor,
    "trainhooks": Trainhooks,
    "torch": TorchSave,
    "safetensors": Safetensors,
    "dcp": DCP,
}


def make_state(device: torch.device, mib: float, tensors: int) -> dict[str, torch.Tensor]:
    n = int(mib * MIB) // 4 // tensors
    generator = torch.Generator(device="cpu").manual_seed(0)
    return {
        f"layer{i:03d}/weight": torch.rand(n, generator=generator).to(device)
        for i in range(tensors)
    }


def summary(times: list[float]) -> dict[str, float]:
    return {"min": min(times), "median": statistics.median(times)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # DCP's stager and writer use the current device
    state = make_state(device, args.mib, args.tensors)
    expected = {k: v.clone() for k, v in state.items()}
    names = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(names) - set(FACTORIES))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {sorted(FACTORIES)}")
    root = tempfile.mkdtemp(prefix="bench-cuda-", dir=args.dir)
    columns = ("save", "cold", "warm", "host_returns", "stall", "total")
    times: dict[str, dict[str, list[float]]] = {m: {c: [] for c in columns} for m in names}
    methods: dict[str, Method] = {}
    try:
        methods.update({m: FACTORIES[m](state, os.path.join(root, m)) for m in names})
        for method in methods.values():  # untimed: first allocations (pinned buffers)
            method.save()
            method.prepare_background()
            warm_up = method.background()
            if warm_up is not None:
                warm_up[0]()
                warm_up[1]()
        for r in range(args.repeat):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                method, t = methods[name], times[name]
                sync(device)
                start = time.perf_counter()
                method.save()
                t["save"].append(time.perf_counter() - start)
                for kind in ("cold", "warm"):
                    if kind == "cold":
                        evict(method.where)
                    with torch.no_grad():
                        for v in state.values():
                            v.fill_(-1.0)
                    sync(device)
                    start = time.perf_counter()
                    method.restore()
                    sync(device)
                    t[kind].append(time.perf_counter() - start)
                    for k, v in state.items():
                        if not torch.equal(v, expected[k]):
                            raise AssertionError(f"{name}: {kind} restore of {k} is wrong")
                method.prepare_background()
                sync(device)
                start = time.perf_counter()
                waits = method.background()
                if waits is not None:
                    may_change, committed = waits
                    t["host_returns"].append(time.perf_counter() - start)
                    may_change()
                    with torch.no_grad():
                        for v in state.values():
                            v.add_(1.0)  # the next step, in place
                    sync(device)
                    t["stall"].append(time.perf_counter() - start)
                    committed()
                    t["total"].append(time.perf_counter() - start)
                    method.restore()  # over the updated state: the saved values again
                    sync(device)
                    for k, v in state.items():
                        if not torch.equal(v, expected[k]):
                            raise AssertionError(f"{name}: the background save of {k} is wrong")
                print(
                    f"  round {r + 1} {name:12s} "
                    + " ".join(f"{c} {t[c][-1]:.3f}" for c in columns if len(t[c]) > r),
                    file=sys.stderr,
                )
    finally:
        for method in methods.values():
            method.close()  # background saves finish before their files go
        shutil.rmtree(root, ignore_errors=True)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "bytes": sum(v.numel() * v.element_size() for v in state.values()),
        "tensors": len(state),
        "repeat": args.repeat,
        "results": {m: {c: summary(v) for c, v in cols.items() if v} for m, cols in times.items()},
    }


def table(result: dict[str, Any]) -> list[str]:
    header = (
        "| method | save | restore cold | restore warm | background: host returns | stall | total |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, cols in result["results"].items():
        cells = []
        for c in ("save", "cold", "warm", "host_returns", "stall", "total"):
            s = cols.get(c)
            cells.append(f"{s['min']:.3f} / {s['median']:.3f}" if s else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a check)")
    parser.add_argument("--mib", type=float, default=1024.0)
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--methods", default="floor,trainhooks,torch,safetensors,dcp")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_cuda: torch.cuda is not available (no GPU here); nothing measured.")
        return 0
    result = run(args)
    mib = result["bytes"] / MIB
    print(
        f"{mib:.0f} MiB in {result['tensors']} tensors on {result['device']}, "
        f"min / median of {result['repeat']} (seconds):\n"
    )
    print("\n".join(table(result)))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
