"""ProfilerHook (TF's ProfilerHookTest): Chrome traces from torch.profiler, or wall time without torch."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tests.helpers.paths import SRC

import trainhooks as th
from trainhooks.hooks.profiler import ProfilerHook
from trainhooks.session.hooked import HookedSession
from trainhooks.session.session import Session


def timelines(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.glob("timeline-*.json"))


def start(hook: ProfilerHook) -> tuple[Session, HookedSession]:
    hook.begin()
    raw = Session()
    hook.after_create_session(raw, None)
    return raw, HookedSession(raw, [hook])


def matmul() -> torch.Tensor:
    return torch.ones(16, 16) @ torch.ones(16, 16)


def test_public_name() -> None:
    assert th.ProfilerHook is ProfilerHook


def test_raise_in_both_secs_and_steps() -> None:
    with pytest.raises(ValueError, match="Can not provide both every_secs and every_steps"):
        ProfilerHook(save_secs=10, save_steps=20)


def test_raise_in_none_secs_and_steps() -> None:
    with pytest.raises(ValueError, match="Either every_secs or every_steps should be provided"):
        ProfilerHook(save_secs=None, save_steps=None)


def test_save_secs_does_not_save_in_first_step(tmp_path: Path) -> None:
    _, sess = start(ProfilerHook(save_secs=2, output_dir=tmp_path))
    sess.run(matmul)
    assert timelines(tmp_path) == []


def test_save_secs_saves_periodically(tmp_path: Path, clock) -> None:
    t0 = clock()
    _, sess = start(ProfilerHook(save_secs=2, output_dir=tmp_path, clock=clock))
    sess.run(matmul)  # Not saved.
    assert timelines(tmp_path) == []
    clock.set(t0 + 2.5)
    sess.run(matmul)  # Saved.
    assert timelines(tmp_path) == ["timeline-2.json"]
    clock.set(t0 + 2.6)
    sess.run(matmul)  # Not saved.
    clock.set(t0 + 4.4)  # just before the next trace is due
    sess.run(matmul)  # Not saved.
    assert len(timelines(tmp_path)) == 1
    clock.set(t0 + 4.5)
    sess.run(matmul)  # Saved.
    assert timelines(tmp_path) == ["timeline-2.json", "timeline-5.json"]


def test_save_steps_does_not_save_in_first_step(tmp_path: Path) -> None:
    _, sess = start(ProfilerHook(save_steps=1, output_dir=tmp_path))
    sess.run(matmul)
    assert timelines(tmp_path) == []


def test_save_steps_saves_periodically(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="trainhooks.hooks.profiler")
    _, sess = start(ProfilerHook(save_steps=2, output_dir=tmp_path))
    counts = []
    for _ in range(5):
        sess.run(matmul)
        counts.append(len(timelines(tmp_path)))
    assert counts == [0, 1, 1, 2, 2]
    assert timelines(tmp_path) == ["timeline-2.json", "timeline-4.json"]
    assert [r.getMessage() for r in caplog.records] == [
        f"Saving timeline for 2 into '{tmp_path / 'timeline-2.json'}'.",
        f"Saving timeline for 4 into '{tmp_path / 'timeline-4.json'}'.",
    ]


def test_run_metadata_saves(tmp_path: Path) -> None:
    _, sess = start(ProfilerHook(save_steps=1, output_dir=tmp_path))
    run_metadata: dict[str, str] = {}
    sess.run(matmul, run_metadata=run_metadata)  # Not saved.
    sess.run(matmul, run_metadata=run_metadata)  # Saved.
    assert list(run_metadata) == ["step_2"]
    assert run_metadata["step_2"] == str(tmp_path / "timeline-2.json")


def test_torch_trace_holds_the_step_ops(tmp_path: Path) -> None:
    _, sess = start(ProfilerHook(save_steps=1, output_dir=tmp_path, show_memory=True))
    sess.run(lambda: None)
    sess.run(matmul)
    trace = json.loads((tmp_path / "timeline-2.json").read_text())
    names = {event.get("name") for event in trace["traceEvents"]}
    assert "aten::mm" in names  # the step's matmul
    assert "session.run" in names  # the span marking the run
    assert "[memory]" in names  # show_memory records allocations


def test_a_failed_traced_run_leaves_no_profiler_running(tmp_path: Path) -> None:
    raw, sess = start(ProfilerHook(save_steps=1, output_dir=tmp_path))
    sess.run(matmul)

    def fails() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        sess.run(fails)  # traced, but after_run never comes
    sess.run(matmul)  # starts a new trace: it would raise if the old profiler still ran
    assert raw.global_step == 2
    assert timelines(tmp_path) == ["timeline-2.json"]


def test_creates_the_output_dir(tmp_path: Path) -> None:
    output_dir = tmp_path / "a" / "b"
    _, sess = start(ProfilerHook(save_steps=1, output_dir=output_dir))
    sess.run(matmul)
    sess.run(matmul)
    assert timelines(output_dir) == ["timeline-2.json"]


def test_wall_time_trace_without_torch(tmp_path: Path) -> None:
    # A NumPy-only install: torch cannot be imported in this process.
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["torch"] = None
        sys.path.insert(0, {str(SRC)!r})
        from trainhooks.hooks.profiler import ProfilerHook
        from trainhooks.session.hooked import HookedSession
        from trainhooks.session.session import Session

        now = [1000.0]
        hook = ProfilerHook(save_steps=1, output_dir={str(tmp_path)!r}, clock=lambda: now[0])
        hook.begin()
        sess = HookedSession(Session(), [hook])

        def step():
            now[0] += 0.25  # the step takes 250 ms
            return {{"loss": 1.0}}

        metadata = {{}}
        for _ in range(2):
            sess.run(step, run_metadata=metadata)
        print(json.dumps(metadata))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(result.stdout) == {"step_2": str(tmp_path / "timeline-2.json")}
    trace = json.loads((tmp_path / "timeline-2.json").read_text())
    (event,) = trace["traceEvents"]
    assert event["name"] == "session.run"
    assert event["ph"] == "X"
    assert event["ts"] == pytest.approx(1000.25e6)
    assert event["dur"] == pytest.approx(0.25e6)
    assert event["args"] == {"global_step": 2}
    assert event["pid"] != os.getpid()


def test_with_a_singular_monitored_session(tmp_path: Path) -> None:
    hook = ProfilerHook(save_steps=2, output_dir=tmp_path)
    counts = []
    with th.SingularMonitoredSession(hooks=[hook], state={"w": torch.zeros(2)}) as sess:
        for _ in range(5):
            sess.run(matmul)
            counts.append(len(timelines(tmp_path)))
    assert counts == [0, 1, 1, 2, 2]
