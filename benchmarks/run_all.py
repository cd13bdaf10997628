#!/usr/bin/env python3
"""The checkpoint benchmark suite: one command, one table, one JSON file.

    python3 dev.py bench                         # 1 GiB float32 state, 3 saves per method
    python3 dev.py bench --gib 0.25 --repeat 2   # a smaller state
    python benchmarks/run_all.py --methods floor,trainhooks_async

Every method of ``bench_async.py`` runs in its own subprocess on the same state
(``bench_checkpoint.make_state``), so no method inherits another's memory or threads.
The table shows, per method, the median over the saves of the training-thread stall
and of the total time until the checkpoint is durable, then checks the goals of
background saving:

* stall of ``trainhooks_async`` at most 2x a plain in-memory copy (``torch.clone``);
* its total at most 1.2x ``trainhooks_sync``;
* a one-thread CPU training loop keeps at least 90% of its steps/s during the save.

Then ``bench_restore.py`` compares save and restore side by side, each state in one
subprocess running every method in rotating order: the 512 MiB float32 state in 32
tensors (floor, safetensors + ``copy_``, ``torch.load`` + ``copy_``, DCP, trainhooks
and trainhooks with ``atomic_restore=False``) and 100,000 tensors of 1 KiB (DCP left
out: minutes per save; no tensor there is large enough for ``atomic_restore=False`` to
change anything), cold (each method's
files dropped from the page cache) and warm, min and median of ``--restore-repeat``
rounds, every restore ending in the state's existing arrays. Its goals: for the large
state, restores within 1.2x of the floor and every column at or below every peer; for
the small one, save within 1.5x and restores within 2x of the floor.

Last, ``bench_cuda.py`` (CUDA state against the floor, ``torch.save``, safetensors and
DCP, ``async_save`` included) where ``torch.cuda`` is available; elsewhere it says so.

The machine's load average before and after goes into the JSON, and the throughput
line says how many cores other processes used during the saves: on a shared machine,
compare only quiet runs.

Results go to ``benchmarks/results/<timestamp>.json`` with the machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_restore  # noqa: E402
from bench_async import METHODS, median  # noqa: E402


def machine(directory: str) -> dict[str, Any]:
    """Cores, memory, disk and CPU model of this machine."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    disk = shutil.disk_usage(directory)
    device = "unknown"
    try:
        out = subprocess.run(
            ["df", "--output=source,fstype", directory], capture_output=True, text=True, check=True
        )
        device = " ".join(out.stdout.split()[2:])
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "disk": f"{device}, {disk.total / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def run_method(method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(HERE / "bench_async.py"), "--method", method]
    cmd += ["--gib", str(args.gib), "--tensors", str(args.tensors), "--repeat", str(args.repeat)]
    if args.dir:
        cmd += ["--dir", args.dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"method": method, "error": out.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_restore(state: str, args: argparse.Namespace) -> dict[str, Any]:
    """``bench_restore.py`` on one state, in a subprocess of its own."""
    cmd = [sys.executable, str(HERE / "bench_restore.py"), "--state", state, "--json"]
    cmd += ["--repeat", str(args.restore_repeat)]
    if args.dir:
        cmd += ["--dir", args.dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"state": state, "error": out.stderr.strip().splitlines()[-1:]}
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run_cuda(args: argparse.Namespace) -> dict[str, Any]:
    """``bench_cuda.py`` in a subprocess: its table printed, its JSON returned."""
    cmd = [sys.executable, str(HERE / "bench_cuda.py"), "--json"]
    cmd += ["--repeat", str(args.restore_repeat)]
    if args.dir:
        cmd += ["--dir", args.dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip()[-2000:]}
    lines = out.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        print("\n".join(lines[:-1]), flush=True)
        return dict(json.loads(lines[-1]))
    print("\n".join(lines), flush=True)
    return {"skipped": " ".join(lines)}


def summarize(result: dict[str, Any]) -> dict[str, float]:
    if "saves" in result:
        saves = result["saves"]
        return {
            "stall_s": median([s["stall_s"] for s in saves]),
            "total_s": median([s["total_s"] for s in saves]),
            "first_stall_s": saves[0]["stall_s"],
        }
    if "clone_s" in result:
        return {
            "stall_s": median(result["clone_s"]),
            "total_s": median(result["clone_s"]),
            "np_copy_s": median(result["np_copy_s"]),
        }
    if "runs" in result:
        runs = result["runs"]
        return {
            "ratio": median([r["ratio"] for r in runs]),
            "ratio_with_stall": median([r["ratio_with_stall"] for r in runs]),
            "alone_steps_per_s": median([r["alone_steps_per_s"] for r in runs]),
            "during_steps_per_s": median([r["during_steps_per_s"] for r in runs]),
            "others_cores": median([r.get("others_cores", float("nan")) for r in runs]),
        }
    return {}


def goals(summary: dict[str, dict[str, float]]) -> list[tuple[str, float, float, bool]]:
    """(goal, measured, limit, met) for each goal whose methods ran."""
    out = []
    copy, sync = summary.get("memcopy"), summary.get("trainhooks_sync")
    background = summary.get("trainhooks_async")
    if copy and background:
        ratio = background["stall_s"] / copy["stall_s"]
        out.append(("stall / torch.clone", ratio, 2.0, ratio <= 2.0))
    if sync and background:
        ratio = background["total_s"] / sync["total_s"]
        out.append(("background total / sync total", ratio, 1.2, ratio <= 1.2))
    if "throughput" in summary and "ratio" in summary["throughput"]:
        ratio = summary["throughput"]["ratio"]
        out.append(("steps/s during save / alone", ratio, 0.9, ratio >= 0.9))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0, help="state size in GiB (float32)")
    p.add_argument("--tensors", type=int, default=100, help="tensors in the state")
    p.add_argument("--repeat", type=int, default=3, help="saves per method")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    p.add_argument("--out", default=str(HERE / "results"), help="where the JSON goes")
    p.add_argument("--restore-repeat", type=int, default=5, help="rounds of bench_restore.py")
    p.add_argument(
        "--restore-states",
        default="large,small",
        help="bench_restore.py's states ('' to skip it)",
    )
    p.add_argument("--skip-async", action="store_true", help="only the save/restore comparison")
    p.add_argument("--skip-cuda", action="store_true", help="leave out bench_cuda.py")
    args = p.parse_args()
    if args.skip_async:
        args.methods = ""
    directory = args.dir or tempfile.gettempdir()
    info = machine(directory)
    load_before = os.getloadavg()
    print(
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM, disk {info['disk']}; "
        f"state {args.gib:g} GiB float32 in {args.tensors} tensors, {args.repeat} saves each"
    )
    print(f"{'method':<18} {'stall s':>8} {'total s':>8} {'x floor':>8} {'1st stall':>9}")
    results: dict[str, Any] = {}
    summary: dict[str, dict[str, float]] = {}
    for method in filter(None, args.methods.split(",")):
        result = run_method(method, args)
        results[method] = result
        if "error" in result:
            print(f"{method:<18} failed: {result['error']}", flush=True)
            continue
        s = summary[method] = summarize(result)
        if method == "throughput":
            print(
                f"{method:<18} {s['alone_steps_per_s']:.0f} steps/s alone, "
                f"{s['during_steps_per_s']:.0f} during the save ({s['ratio']:.0%}; "
                f"{s['ratio_with_stall']:.0%} counting the stall; other processes used "
                f"{s['others_cores']:.2f} cores meanwhile)",
                flush=True,
            )
            continue
        floor = summary.get("floor", {}).get("total_s")
        x_floor = f"{s['total_s'] / floor:8.2f}" if floor else f"{'':>8}"
        first = f"{s['first_stall_s']:9.3f}" if "first_stall_s" in s else f"{'':>9}"
        print(f"{method:<18} {s['stall_s']:8.3f} {s['total_s']:8.3f} {x_floor} {first}", flush=True)
    checked = goals(summary)
    restores: dict[str, Any] = {}
    for state in filter(None, args.restore_states.split(",")):
        result = run_restore(state, args)
        restores[state] = result
        if "error" in result:
            print(f"restore comparison, {state} state, failed: {result['error']}", flush=True)
            continue
        print()
        print("\n".join(bench_restore.table(result)), flush=True)
        checked += bench_restore.goals(result)
    print()
    cuda = {"skipped": "--skip-cuda"} if args.skip_cuda else run_cuda(args)
    if "error" in cuda:
        print(f"CUDA comparison failed: {cuda['error']}", flush=True)
    print()
    for name, measured, limit, met in checked:
        print(f"goal {name:<40} {measured:6.2f} (limit {limit}) {'met' if met else 'NOT MET'}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, time.strftime("%Y%m%d-%H%M%S") + ".json")
    record = {
        "machine": info,
        "config": {
            "gib": args.gib,
            "tensors": args.tensors,
            "repeat": args.repeat,
            "restore_repeat": args.restore_repeat,
        },
        "loadavg": {"before": load_before, "after": os.getloadavg()},
        "summary": summary,
        "goals": [{"goal": g, "measured": m, "limit": lim, "met": ok} for g, m, lim, ok in checked],
        "raw": results,
        "restore": restores,
        "cuda": cuda,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
