"""The README's usage examples run as written (paths pointed at a temp dir, fewer steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_first_example_trains_checkpoints_and_resumes(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    code = python_blocks()[0].replace('"/tmp/run1"', repr(str(tmp_path)))
    code = code.replace("last_step=1000", "last_step=120")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    import trainhooks as th

    assert th.load_variable(str(tmp_path), "global_step") == 120
    # Running it again restores step 120 and trains nothing: StopAtStepHook sees the
    # restored step when the session is created. (TensorFlow 2.21 runs one more step
    # here, to 121: its hook only checks after a run; the README's porting table says so.)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert th.load_variable(str(tmp_path), "global_step") == 120


def test_the_listener_example_reports_each_save(tmp_path: Path, capsys) -> None:
    pytest.importorskip("torch")
    setup, listener_code = python_blocks()[0], python_blocks()[1]
    setup = setup.split("with th.MonitoredTrainingSession(")[0]
    code = (
        setup
        + "state = {'model': model, 'optimizer': optimizer}\n"
        + listener_code.replace('"/tmp/run1"', repr(str(tmp_path)))
        .replace("save_steps=100", "save_steps=2")
        .replace("    ...", "    for _ in range(4):\n        sess.run(train_step)")
    )
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines() == [f"checkpoint at step {s}" for s in (0, 2, 4)]
    # The example passes the hook's directory to the session: run again, it resumes at 4.
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.splitlines() == [f"checkpoint at step {s}" for s in (4, 6, 8)]
