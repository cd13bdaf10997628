"""GlobalStepWaiterHook in a synchronous torch.distributed job fails clearly, never hangs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from tests.helpers.paths import SRC

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # two torch processes

RANK_PROGRAM = textwrap.dedent(
    """
    import os, sys
    from datetime import timedelta
    import torch.distributed as dist
    import trainhooks as th

    dist.init_process_group("gloo", init_method=sys.argv[1], rank=int(sys.argv[2]),
                            world_size=2, timeout=timedelta(seconds=20))
    try:
        with th.MonitoredSession(hooks=[th.GlobalStepWaiterHook(wait_until_step=5)]) as sess:
            sess.run(lambda: None)
        print("ran")
    except th.errors.InvalidArgumentError as e:
        print("refused:", e)
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_waiting_for_a_step_in_a_lockstep_job_raises_instead_of_hanging(tmp_path: Path) -> None:
    init = f"file://{tmp_path}/rendezvous-{uuid.uuid4().hex}"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK_PROGRAM, init, str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=90)[0] for p in procs]
    for out in outputs:
        assert "refused: GlobalStepWaiterHook(wait_until_step=5) would wait forever" in out
