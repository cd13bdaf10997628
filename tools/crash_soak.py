"""Crash soak: SIGKILL a real training process hundreds of times; no checkpoint may be damaged.

Runs the loop of ``tests/_programs/crash_driver.py`` (the same one ``tests/checkpoint/
test_crash.py`` runs 50 times): start the training program on one directory, kill it with
SIGKILL at a random moment, check that every listed checkpoint verifies and the latest
restores bit for bit to the state of its step, and that the next start finds no
leftovers.

Usage::

    .venv/bin/python tools/crash_soak.py --kills 500              # both modes, 500 each
    .venv/bin/python tools/crash_soak.py --kills 500 --mode async --dir /mnt/nfs/soak

Exit status 0 when every round passed; the summary line is printed either way.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(
    0,
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "_programs"),
)

import crash_driver


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=500, help="kills per mode (default 500)")
    parser.add_argument("--mode", choices=["mts", "async", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dir", default=None, help="where to put the checkpoints (default: a temp dir)"
    )
    args = parser.parse_args()
    modes = ["mts", "async"] if args.mode == "both" else [args.mode]
    base = args.dir or tempfile.mkdtemp(prefix="trainhooks-soak-")
    failed = False
    for i, mode in enumerate(modes):
        start = time.monotonic()
        try:
            result = crash_driver.crash_loop(
                os.path.join(base, mode), args.kills, mode=mode, seed=args.seed + i
            )
        except AssertionError as e:
            print(f"[{mode}] FAILED: {e}", flush=True)
            failed = True
            continue
        print(f"[{mode}] OK: {result.summary()} in {time.monotonic() - start:.0f} s", flush=True)
    print(f"checkpoints in {base}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
