"""The project demo (``python3 dev.py demo``): train, SIGKILL part way, resume, bit-identical."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tests.helpers.paths import ROOT

DEMO = ROOT / "examples" / "demo.py"
# The whole demo: trains in a child process, SIGKILLs it, resumes and trains to the end.
pytestmark = pytest.mark.slow


@pytest.mark.skipif(os.name != "posix", reason="the demo kills its child with SIGKILL")
def test_demo_resumes_after_sigkill_and_finishes_bit_identical(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(DEMO), "--workdir", str(tmp_path), "--last-step", "100",
         "--kill-after", "30"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    killed_at = int(re.search(r"killed \(SIGKILL\) at step (\d+) of 100", out).group(1))  # type: ignore[union-attr]
    resumed_at = int(re.search(r"resumed from the checkpoint at step (\d+)", out).group(1))  # type: ignore[union-attr]
    assert 30 <= resumed_at <= killed_at < 100 and resumed_at % 5 == 0
    assert re.search(rf"trained steps {resumed_at + 1}-100\b", out)
    assert "bit-identical: yes; final weights identical: yes" in out
    # Both runs left their checkpoints; the resumed one ends at the last step.
    for run in ("reference", "crash-and-resume"):
        state = (tmp_path / run / "checkpoint").read_text()
        assert f'model_checkpoint_path: "{tmp_path / run / "model.ckpt-100"}"' in state
