#!/usr/bin/env python3
"""Save and restore one state with trainhooks and its peers; compare with the disk's floor.

    python benchmarks/bench_checkpoint.py            # 1 GiB in 100 tensors, 100k small tensors
    python benchmarks/bench_checkpoint.py --small    # a quick run (64 MiB, 10k tensors)
    python benchmarks/bench_checkpoint.py --checksums  # checksum throughput and GIL release

Every (state, method) pair runs in its own subprocess, which builds the state, saves
it (timed, durable: each method's files are fsynced), evicts the files from the page
cache (fsync, then ``posix_fadvise(DONTNEED)`` on every file it wrote, so the restore
reads the disk as after a restart), restores it (timed: "cold"), restores it again
without evicting ("warm": the page cache holds the files) and reports its peak memory
above the state during the save (``VmHWM`` after resetting it through
``/proc/self/clear_refs``). Every restore ends with the values in the state's existing
arrays. ``bench_restore.py`` (in ``dev.py bench``) runs the methods side by side in one
process, in rotating order, with min and median; prefer it for comparisons.

Methods: ``floor`` (the tensors' bytes written to one file with ``os.writev`` and read
back into the state's arrays with ``os.preadv``: the least work any format needs),
``torch`` (``torch.save`` / ``torch.load(weights_only=True)`` + ``copy_``),
``safetensors`` (``save_file`` / ``load_file`` + a copy into each array), ``trainhooks``
(``Saver.save`` / ``Saver.restore``: verifies every checksum, then restores in place)
and ``format`` (trainhooks without ``Saver``: ``flatten_state`` + ``write_checkpoint``,
``open_checkpoint`` + ``verify`` + ``restore_state``; what the format itself costs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from bench_restore import evict  # the benchmarks run as scripts from this folder

METHODS = ("floor", "torch", "safetensors", "trainhooks", "format")
MIB = 2**20


def make_state(kind: str, args: argparse.Namespace) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if kind == "large":
        total = int(args.gib * 2**30) // 4
        sizes = [total // args.tensors] * args.tensors
        return {
            f"layer{i:03d}/weight": rng.random(n, dtype=np.float32) for i, n in enumerate(sizes)
        }
    return {
        f"block{i // 100:04d}/param{i % 100:02d}": rng.random(args.small_elems, dtype=np.float32)
        for i in range(args.small_count)
    }


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_file_dir(os.path.dirname(path))


def _fsync_file_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- methods: each returns (save, restore) closures over the state and a directory -------------


def floor(state: dict[str, np.ndarray], d: str) -> tuple[Callable[[], None], Callable[[], None]]:
    path = os.path.join(d, "raw.bin")
    views = [memoryview(a).cast("B") for a in state.values()]

    def save() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for i in range(0, len(views), 1024):
                batch = views[i : i + 1024]
                if os.writev(fd, batch) != sum(len(v) for v in batch):
                    raise OSError("short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_file_dir(d)

    def restore() -> None:
        targets = [memoryview(a).cast("B") for a in state.values()]  # the state's own memory
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            for i in range(0, len(targets), 1024):
                batch = targets[i : i + 1024]
                offset += os.preadv(fd, batch, offset)
        finally:
            os.close(fd)
        assert offset == sum(len(v) for v in views)

    return save, restore


def torch_method(
    state: dict[str, np.ndarray], d: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    import torch

    path = os.path.join(d, "state.pt")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}

    def save() -> None:
        torch.save(tensors, path)
        _fsync_file(path)

    def restore() -> None:
        loaded = torch.load(path, weights_only=True)
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.copy_(loaded[name])

    return save, restore


def safetensors_method(
    state: dict[str, np.ndarray], d: str
) -> tuple[Callable[[], None], Callable[[], None]]:
    from safetensors.numpy import load_file, save_file

    path = os.path.join(d, "state.safetensors")

    def save() -> None:
        save_file(state, path)
        _fsync_file(path)

    def restore() -> None:
        loaded = load_file(path)  # 0.8 maps lazily: the copies read the file
        for name, array in state.items():
            np.copyto(array, loaded[name])

    return save, restore


class _Holder:
    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.global_step = 100


def trainhooks_method(
    state: dict[str, np.ndarray], d: str, format_only: bool = False
) -> tuple[Callable[[], None], Callable[[], None]]:
    holder = _Holder(state)
    prefix = os.path.join(d, "model.ckpt")
    try:
        from trainhooks.checkpoint.saver import Saver
    except ImportError:
        Saver = None  # fall back to the format layer alone

    if Saver is not None and not format_only:
        saver = Saver()

        def save() -> None:
            saver.save(holder, prefix, global_step=holder.global_step)

        def restore() -> None:
            saver.restore(holder, f"{prefix}-{holder.global_step}")

        return save, restore

    from trainhooks.checkpoint.format.opening import open_checkpoint
    from trainhooks.checkpoint.saving.write import write_checkpoint
    from trainhooks.checkpoint.state.tree import flatten_state, restore_state

    def save() -> None:
        write_checkpoint(f"{prefix}-100", flatten_state(state), global_step=100)

    def restore() -> None:
        with open_checkpoint(f"{prefix}-100") as ckpt:
            ckpt.verify()
            restore_state(state, ckpt.tree, ckpt.tensor_data, locate=ckpt.locator())

    return save, restore


FACTORIES = {
    "floor": floor,
    "torch": torch_method,
    "safetensors": safetensors_method,
    "trainhooks": trainhooks_method,
    "format": lambda state, d: trainhooks_method(state, d, format_only=True),
}


def worker(args: argparse.Namespace) -> None:
    state = make_state(args.worker_state, args)
    directory = tempfile.mkdtemp(prefix="bench-", dir=args.dir)
    try:
        save, restore = FACTORIES[args.worker_method](state, directory)
        rss_before = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (the peak RSS) to the current RSS
        start = time.perf_counter()
        save()
        save_s = time.perf_counter() - start
        peak = _status("VmHWM") - rss_before
        evict(directory)
        start = time.perf_counter()
        restore()
        restore_s = time.perf_counter() - start
        start = time.perf_counter()
        restore()
        warm_s = time.perf_counter() - start
    finally:
        shutil.rmtree(directory)
    print(
        json.dumps(
            {"save_s": save_s, "restore_s": restore_s, "warm_s": warm_s, "peak_mib": peak / MIB}
        )
    )


def run_one(state: str, method: str, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker-state", state, "--worker-method", method]
    cmd += ["--gib", str(args.gib), "--tensors", str(args.tensors)]
    cmd += ["--small-count", str(args.small_count), "--small-elems", str(args.small_elems)]
    if args.dir:
        cmd += ["--dir", args.dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{method} on {state} failed:\n{out.stderr}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def checksums() -> None:
    """Throughput of each candidate on 256 MiB, and whether it releases the GIL."""
    import hashlib

    import xxhash

    data = memoryview(np.random.default_rng(0).integers(0, 255, 256 * MIB, dtype=np.uint8))
    candidates: dict[str, Callable[[memoryview], object]] = {
        "zlib.crc32": zlib.crc32,
        "xxh3_64": xxhash.xxh3_64_intdigest,
        "xxh3_128": xxhash.xxh3_128_intdigest,
        "blake2b": lambda b: hashlib.blake2b(b).digest(),
    }
    try:
        import crc32c

        candidates["crc32c"] = crc32c.crc32c
    except ImportError:
        pass
    print(f"{'checksum':<12} {'GB/s':>6}  {'Python thread progress while hashing':>36}")
    for name, fn in candidates.items():
        fn(data[: 16 * MIB])
        start = time.perf_counter()
        fn(data)
        rate = len(data) / (time.perf_counter() - start) / 1e9
        # A Python thread counts while the main thread hashes; with the GIL held it stalls.
        count = [0]
        stop = threading.Event()

        def spin(count: list[int] = count, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                count[0] += 1

        spinner = threading.Thread(target=spin)
        spinner.start()
        time.sleep(0.05)
        before = count[0]
        start = time.perf_counter()
        for _ in range(4):
            fn(data)
        hashing = time.perf_counter() - start
        during = count[0] - before
        time.sleep(hashing)
        alone = count[0] - before - during
        stop.set()
        spinner.join()
        print(f"{name:<12} {rate:6.1f}  {100 * during / max(alone, 1):35.0f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="size of the large state (GiB)")
    p.add_argument("--tensors", type=int, default=100, help="tensors in the large state")
    p.add_argument("--small-count", type=int, default=100_000, help="tensors in the small state")
    p.add_argument("--small-elems", type=int, default=256, help="float32s per small tensor")
    p.add_argument("--small", action="store_true", help="quick run: 64 MiB and 10k tensors")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--states", default="large,small", help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the median is shown")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    p.add_argument("--checksums", action="store_true", help="measure checksum candidates")
    p.add_argument("--worker-state", help=argparse.SUPPRESS)
    p.add_argument("--worker-method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dir is not None:
        os.makedirs(args.dir, exist_ok=True)
    if args.worker_state:
        worker(args)
        return
    if args.checksums:
        checksums()
        return
    if args.small:
        args.gib, args.small_count = 1 / 16, 10_000
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, dir {args.dir or tempfile.gettempdir()}"
    )
    header = (
        f"{'state':<22} {'method':<12} {'save s':>7} {'x floor':>7} {'restore s':>9} "
        f"{'x floor':>7} {'warm s':>7} {'x floor':>7} {'peak MiB':>8}"
    )
    print(header)
    for state in args.states.split(","):
        label = (
            f"{args.gib:g} GiB / {args.tensors} tensors"
            if state == "large"
            else f"{args.small_count} x {args.small_elems * 4} B"
        )
        methods = args.methods.split(",")
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
        for _ in range(args.repeat):  # round robin, so that disk weather hits all alike
            for method in methods:
                runs[method].append(run_one(state, method, args))
        base: dict[str, float] | None = None
        for method in methods:
            r = {k: float(np.median([run[k] for run in runs[method]])) for k in runs[method][0]}
            base = base or r
            print(
                f"{label:<22} {method:<12} {r['save_s']:7.2f} {r['save_s'] / base['save_s']:7.2f} "
                f"{r['restore_s']:9.2f} {r['restore_s'] / base['restore_s']:7.2f} "
                f"{r['warm_s']:7.2f} {r['warm_s'] / base['warm_s']:7.2f} {r['peak_mib']:8.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
