"""Run a torch.distributed job of real processes: one program started once per rank.

Every rank gets ``RANK``, ``WORLD_SIZE`` and a ``RUN_ID`` naming its rendezvous file,
writes ``<dir>/result-<rank>.json`` and ends; a rank still running at the deadline is
killed, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tests.helpers.paths import SRC


def run_job(
    program: Path,
    directory: Path,
    world: int,
    *args: str,
    timeout: float = 150,
    after_first_exit: float | None = None,
) -> list[dict[str, Any]]:
    """Run one job of ``world`` ranks of ``program`` to the end; every rank's result.

    Each result has the rank's ``stderr`` (its tail), ``returncode`` and
    ``killed_at_deadline`` (still running ``timeout`` seconds after the start, or
    ``after_first_exit`` seconds after the first rank ended where given: a hang) beside
    what the program wrote; a rank that wrote nothing has no more than these.
    ``after_first_exit`` is for a job with a rank that hangs on purpose: the test need
    not wait out a ``timeout`` generous enough for a loaded machine.
    """
    run_id = uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", RUN_ID=run_id)
    logs = [directory.parent / f"{directory.name}-{run_id}-rank{rank}.log" for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(program), str(directory), *args],
                    env=dict(env, RANK=str(rank), WORLD_SIZE=str(world)),
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            )
    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    try:
        if after_first_exit is None:
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass  # killed below; its result says so
        else:
            first_exit = None
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                if first_exit is None and any(p.poll() is not None for p in procs):
                    first_exit = time.monotonic()
                    deadline = min(deadline, first_exit + after_first_exit)
                time.sleep(0.05)
    finally:
        for rank, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
                p.wait()
                killed.add(rank)
    results = []
    for rank in range(world):
        path = directory / f"result-{rank}.json"
        try:
            result = json.loads(path.read_text()) if path.exists() else {"rank": rank}
        except json.JSONDecodeError:
            if rank not in killed:
                raise
            result = {"rank": rank}  # killed while it wrote its result: none
        result["stderr"] = logs[rank].read_text()[-3000:]
        result["returncode"] = procs[rank].returncode
        result["killed_at_deadline"] = rank in killed
        results.append(result)
        if path.exists():
            path.unlink()
    return results
