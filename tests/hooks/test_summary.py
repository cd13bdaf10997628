"""SummarySaverHook and SummaryWriterCache (TF's SummarySaverHookTest), read back by TensorBoard.

TF's summary op was ``scalar('my_summary', assign_add(var, 1))``: its value counts how
often it was evaluated. A callable that increments a counter plays that part here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboardX import SummaryWriter

import trainhooks as th
from trainhooks.hooks.summary import EventFileWriter, SummarySaverHook, SummaryWriterCache
from trainhooks.session.creators import Scaffold
from trainhooks.session.hooked import HookedSession
from trainhooks.session.session import Session


class Counter:
    """``my_summary``: +1 each time it is evaluated; ``my_summary2`` is twice that."""

    def __init__(self) -> None:
        self.value = 0.0

    def my_summary(self) -> float:
        self.value += 1.0
        return self.value

    def both(self) -> dict[str, float]:
        value = self.my_summary()
        return {"my_summary": value, "my_summary2": 2 * value}


def summaries(logdir: Path) -> dict[int, dict[str, float]]:
    """step -> {tag: value} for every scalar TensorBoard finds in ``logdir``."""
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def session_starts(logdir: Path) -> list[int]:
    """The steps of the SessionLog(START) events in ``logdir``'s event files."""
    steps = []
    for name in sorted(os.listdir(logdir)):
        for event in EventFileLoader(str(logdir / name)).Load():
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                steps.append(event.step)
    return steps


def run_hook(hook: SummarySaverHook, runs: int, clock: Any = None, advance_secs: float = 0.0):
    hook.begin()
    raw = Session()
    mon_sess = HookedSession(raw, [hook])
    for _ in range(runs):
        mon_sess.run(lambda: None)
        if clock is not None:
            clock.advance(advance_secs)
    hook.end(raw)
    return raw


def test_public_name() -> None:
    assert th.SummarySaverHook is SummarySaverHook


def test_raise_when_scaffold_and_summary_op_both_missing() -> None:
    with pytest.raises(ValueError, match="Exactly one of scaffold or summary_op must be provided"):
        SummarySaverHook()


def test_raise_when_scaffold_and_summary_op_both_present() -> None:
    with pytest.raises(ValueError, match="Exactly one of scaffold or summary_op must be provided"):
        SummarySaverHook(scaffold=Scaffold(), summary_op="loss")


def test_raise_in_both_secs_and_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Can not provide both every_secs and every_steps"):
        SummarySaverHook(save_secs=10, save_steps=20, output_dir=tmp_path, summary_op="loss")


def test_raise_in_none_secs_and_steps(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Either every_secs or every_steps should be provided"):
        SummarySaverHook(save_secs=None, save_steps=None, output_dir=tmp_path, summary_op="loss")


def test_raise_on_a_summary_op_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"summary_op must be a fetch name.*got 3"):
        SummarySaverHook(save_steps=1, summary_op=3)


def test_save_steps(tmp_path: Path) -> None:
    counter = Counter()
    hook = SummarySaverHook(
        save_steps=8, output_dir=tmp_path, summary_op={"my_summary": counter.my_summary}
    )
    run_hook(hook, 30)
    assert summaries(tmp_path) == {
        1: {"my_summary": 1.0},
        9: {"my_summary": 2.0},
        17: {"my_summary": 3.0},
        25: {"my_summary": 4.0},
    }
    assert session_starts(tmp_path) == [1]


def test_multiple_summaries(tmp_path: Path) -> None:
    counter = Counter()
    hook = SummarySaverHook(save_steps=8, output_dir=tmp_path, summary_op=counter.both)
    run_hook(hook, 10)
    assert summaries(tmp_path) == {
        1: {"my_summary": 1.0, "my_summary2": 2.0},
        9: {"my_summary": 2.0, "my_summary2": 4.0},
    }


def test_save_secs_saving_once_every_step(tmp_path: Path, clock) -> None:
    counter = Counter()
    hook = SummarySaverHook(
        save_secs=0.5,
        output_dir=tmp_path,
        summary_op={"my_summary": counter.my_summary},
        clock=clock,
    )
    run_hook(hook, 4, clock, 0.5)
    assert summaries(tmp_path) == {s: {"my_summary": float(s)} for s in (1, 2, 3, 4)}


def test_save_secs_saving_once_every_three_steps(tmp_path: Path, clock) -> None:
    counter = Counter()
    hook = SummarySaverHook(
        save_secs=9.0,
        output_dir=tmp_path,
        summary_op={"my_summary": counter.my_summary},
        clock=clock,
    )
    run_hook(hook, 8, clock, 3.1)
    # 24.8 seconds pass (3.1 * 8); it saves every 9 seconds from the first run.
    assert summaries(tmp_path) == {
        1: {"my_summary": 1.0},
        4: {"my_summary": 2.0},
        7: {"my_summary": 3.0},
    }


def test_summary_op_forms(tmp_path: Path) -> None:
    state = {"w": np.float32(0.5), "b": torch.tensor([2.0])}
    hook = SummarySaverHook(
        save_steps=100,
        output_dir=tmp_path,
        summary_op=["loss", "w", "b", lambda: {"lr": 0.1}],
    )
    hook.begin()
    raw = Session(state)
    mon_sess = HookedSession(raw, [hook])
    assert mon_sess.run(lambda: {"loss": torch.tensor(1.5)}) == {"loss": torch.tensor(1.5)}
    hook.end(raw)
    assert summaries(tmp_path) == {1: {"loss": 1.5, "w": 0.5, "b": 2.0, "lr": pytest.approx(0.1)}}


def test_a_single_name_is_tagged_with_the_name(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=2, output_dir=tmp_path, summary_op="loss")
    hook.begin()
    raw = Session()
    mon_sess = HookedSession(raw, [hook])
    for loss in (4.0, 3.0, 2.0):
        mon_sess.run(lambda loss=loss: {"loss": loss})
    hook.end(raw)
    assert summaries(tmp_path) == {1: {"loss": 4.0}, 3: {"loss": 2.0}}


def test_summary_op_from_scaffold_is_read_at_begin(tmp_path: Path) -> None:
    counter = Counter()
    hook = SummarySaverHook(
        save_steps=1, output_dir=tmp_path, scaffold=Scaffold(summary_op=counter.both)
    )
    run_hook(hook, 2)
    assert summaries(tmp_path) == {
        1: {"my_summary": 1.0, "my_summary2": 2.0},
        2: {"my_summary": 2.0, "my_summary2": 4.0},
    }


def test_scaffold_without_summary_op_writes_only_the_session_start(tmp_path: Path) -> None:
    run_hook(SummarySaverHook(save_steps=1, output_dir=tmp_path, scaffold=Scaffold()), 3)
    assert summaries(tmp_path) == {}
    assert session_starts(tmp_path) == [1]


def test_steps_that_jump_are_written_at_the_real_step(tmp_path: Path) -> None:
    # As in TF, whether a run writes is decided before it, as if it advanced the step
    # by one: with +5 per run and save_steps=10, the run from 15 to 20 is the first
    # one expected to reach 15 + 1 >= 5 + 10.
    hook = SummarySaverHook(save_steps=10, output_dir=tmp_path, summary_op="global_step")
    hook.begin()
    raw = Session(advance_global_step=False)
    mon_sess = HookedSession(raw, [hook])

    def five_steps() -> None:
        raw.global_step += 5

    for _ in range(5):
        mon_sess.run(five_steps)
    hook.end(raw)
    assert summaries(tmp_path) == {5: {"global_step": 5.0}, 20: {"global_step": 20.0}}


def test_restart_drops_the_orphaned_events_in_tensorboard(tmp_path: Path) -> None:
    # A job writes steps 1..6, crashes, and restarts from a checkpoint at step 3.
    first = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op="global_step")
    run_hook(first, 6)
    SummaryWriterCache.clear()

    second = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op="global_step")
    second.begin()
    raw = Session(global_step=3)
    mon_sess = HookedSession(raw, [second])
    mon_sess.run(lambda: None)
    second.end(raw)

    assert session_starts(tmp_path) == [1, 4]
    # TensorBoard's START handling discards the first job's steps >= 4.
    assert sorted(summaries(tmp_path)) == [1, 2, 3, 4]


def test_no_writer_no_output(tmp_path: Path) -> None:
    counter = Counter()
    hook = SummarySaverHook(save_steps=1, summary_op={"my_summary": counter.my_summary})
    run_hook(hook, 3)
    assert os.listdir(tmp_path) == []
    assert counter.value == 0  # nothing to write, so the summary is never evaluated


def test_tensorboardx_summary_writer(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    hook = SummarySaverHook(save_steps=2, summary_writer=writer, summary_op="global_step")
    run_hook(hook, 3)
    writer.close()
    assert summaries(tmp_path) == {1: {"global_step": 1.0}, 3: {"global_step": 3.0}}
    assert session_starts(tmp_path) == [1]


def test_a_writer_with_only_add_scalar_and_flush() -> None:
    class ListWriter:
        def __init__(self) -> None:
            self.scalars: list[tuple[str, float, int | None]] = []
            self.flushes = 0

        def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
            self.scalars.append((tag, scalar_value, global_step))

        def flush(self) -> None:
            self.flushes += 1

    writer = ListWriter()
    run_hook(SummarySaverHook(save_steps=2, summary_writer=writer, summary_op="global_step"), 3)
    assert writer.scalars == [("global_step", 1.0, 1), ("global_step", 3.0, 3)]
    assert writer.flushes == 1  # end flushes


def test_a_non_scalar_summary_names_the_tag(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op="w")
    hook.begin()
    mon_sess = HookedSession(Session({"w": np.zeros((2, 3))}), [hook])
    with pytest.raises(
        ValueError, match=r"Summary 'w' must be a single number, got ndarray of shape \(2, 3\)"
    ):
        mon_sess.run(lambda: None)


def test_a_callable_returning_a_scalar_says_how_to_tag_it(tmp_path: Path) -> None:
    def loss() -> float:
        return 1.0

    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op=loss)
    hook.begin()
    mon_sess = HookedSession(Session(), [hook])
    with pytest.raises(TypeError, match=r"must return a dict \{tag: scalar\}.*\{'my_tag': loss\}"):
        mon_sess.run(lambda: None)


# --- SummaryWriterCache and EventFileWriter ---------------------------------------------------


def test_cache_shares_one_writer_per_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    writer = SummaryWriterCache.get("logs")
    assert SummaryWriterCache.get(tmp_path / "logs") is writer
    assert SummaryWriterCache.get("./logs/") is writer
    assert SummaryWriterCache.get("other") is not writer
    writer.add_scalar("x", 1.0, global_step=1)
    SummaryWriterCache.clear()  # closes (flushes) every writer
    assert summaries(tmp_path / "logs") == {1: {"x": 1.0}}
    assert SummaryWriterCache.get("logs") is not writer  # a new writer, in a new file
    SummaryWriterCache.clear()
    assert len(os.listdir(tmp_path / "logs")) == 2


def test_event_file_writer_flush_is_durable(tmp_path: Path) -> None:
    writer = EventFileWriter(tmp_path)
    writer.add_scalar("loss", torch.tensor(0.25), global_step=7, walltime=123.0)
    writer.flush()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    (event,) = acc.Scalars("loss")
    assert (event.step, event.value, event.wall_time) == (7, 0.25, 123.0)
    writer.close()
    with pytest.raises(ValueError, match="is closed; get an open one with SummaryWriterCache"):
        writer.add_scalar("loss", 1.0)


def test_two_writers_in_one_directory_write_two_files(tmp_path: Path) -> None:
    first, second = EventFileWriter(tmp_path), EventFileWriter(tmp_path)
    first.add_scalar("a", 1.0, global_step=1)
    second.add_scalar("b", 2.0, global_step=1)
    first.close()
    second.close()
    assert len(os.listdir(tmp_path)) == 2
    assert summaries(tmp_path) == {1: {"a": 1.0, "b": 2.0}}


def test_monitored_training_session_writes_summaries_and_step_rate(tmp_path: Path) -> None:
    # TF's test_summaries_steps: both default hooks write into summary_dir.
    counter = Counter()
    with th.MonitoredTrainingSession(
        summary_dir=str(tmp_path),
        scaffold=Scaffold(summary_op={"my_summary_tag": counter.my_summary}),
        save_summaries_steps=2,
        log_step_count_steps=2,
        hooks=[th.StopAtStepHook(last_step=6)],
        state={"w": np.zeros(2)},
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: None)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["global_step/sec", "my_summary_tag"]
    assert [e.step for e in acc.Scalars("my_summary_tag")] == [1, 3, 5]
    assert [e.value for e in acc.Scalars("my_summary_tag")] == [1.0, 2.0, 3.0]
    assert session_starts(tmp_path) == [1]


def test_a_hook_reused_after_the_cache_was_cleared_gets_an_open_writer(tmp_path: Path) -> None:
    hook = SummarySaverHook(save_steps=1, output_dir=tmp_path, summary_op="global_step")
    run_hook(hook, 1)
    SummaryWriterCache.clear()
    hook.begin()
    raw = Session(global_step=1)
    HookedSession(raw, [hook]).run(lambda: None)
    hook.end(raw)
    assert summaries(tmp_path) == {1: {"global_step": 1.0}, 2: {"global_step": 2.0}}
