"""HookedSession (TF's _HookedSession): ported from HookedSessionTest in monitored_session_test.py."""

from __future__ import annotations

import re
from typing import Any

import pytest

from trainhooks.session.hooked import HookedSession
from trainhooks.session.run_hook import (
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from trainhooks.session.session import Session


class FakeHook(SessionRunHook):
    """Counts calls, records what it saw, and returns ``request`` from ``before_run``."""

    def __init__(self) -> None:
        self.should_stop = False
        self.request: SessionRunArgs | None = None
        self.call_counter = {"begin": 0, "after_create_session": 0, "before_run": 0, "after_run": 0}
        self.last_run_context: SessionRunContext | None = None
        self.last_run_values: SessionRunValues | None = None

    def begin(self) -> None:
        self.call_counter["begin"] += 1

    def after_create_session(self, session: Session, coord: Any) -> None:
        self.call_counter["after_create_session"] += 1

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        self.call_counter["before_run"] += 1
        self.last_run_context = run_context
        return self.request

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.call_counter["after_run"] += 1
        self.last_run_values = run_values
        if self.should_stop:
            run_context.request_stop()


def _tensors() -> dict[str, Any]:
    return {"a_tensor": [0], "another_tensor": [5], "third_tensor": [10]}


def test_calls_hooks_around_the_run() -> None:
    sess = Session(_tensors())
    hooks = [FakeHook(), FakeHook()]
    hooked = HookedSession(sess, hooks)
    assert hooked.run("a_tensor") == [0]
    for hook in hooks:
        assert hook.call_counter == {
            "begin": 0,
            "after_create_session": 0,
            "before_run": 1,
            "after_run": 1,
        }
        assert hook.last_run_values == SessionRunValues(results=None, options={}, run_metadata={})
        assert hook.last_run_context is not None
        assert hook.last_run_context.original_args == SessionRunArgs("a_tensor")
        assert hook.last_run_context.session is sess
    assert hooks[0].last_run_context is hooks[1].last_run_context  # one context per run


def test_should_stop_is_set_after_the_run_and_sticky() -> None:
    hook, hook2 = FakeHook(), FakeHook()
    hooked = HookedSession(Session(_tensors()), [hook, hook2])
    hooked.run("a_tensor")
    assert not hooked.should_stop()
    hook.should_stop = True
    hooked.run("a_tensor")
    assert hooked.should_stop()
    assert hook2.call_counter["after_run"] == 2  # a stop request skips no later after_run
    hook.should_stop = False
    assert hooked.should_stop()
    with pytest.raises(
        RuntimeError, match=re.escape("Run called even after should_stop requested.")
    ):
        hooked.run("a_tensor")


def test_fetches_hook_requests() -> None:
    hook, hook2 = FakeHook(), FakeHook()
    hook.request = SessionRunArgs(["another_tensor"])
    hook2.request = SessionRunArgs({"t": "third_tensor", "f": lambda: "computed"})
    hooked = HookedSession(Session(_tensors()), [hook, hook2])
    assert hooked.run(fetches="a_tensor") == [0]
    assert hook.last_run_values is not None and hook2.last_run_values is not None
    assert hook.last_run_values.results == [[5]]
    assert hook2.last_run_values.results == {"t": [10], "f": "computed"}


def test_hooks_see_the_step_after_it_advanced() -> None:
    hook = FakeHook()
    hook.request = SessionRunArgs("global_step")
    sess = Session({}, global_step=41)
    hooked = HookedSession(sess, [hook])
    assert hooked.run(lambda: sess.global_step) == 41
    assert hook.last_run_values is not None and hook.last_run_values.results == 42


def test_only_hooks_have_feeds() -> None:
    hook, hook2 = FakeHook(), FakeHook()
    hook.request = SessionRunArgs(None, feed_dict={"a": 5})
    hook2.request = SessionRunArgs(None, feed_dict={"b": 10})
    hooked = HookedSession(Session({}), [hook, hook2])
    assert hooked.run(lambda a, b: a + b) == 15


def test_both_hooks_and_user_have_feeds() -> None:
    hook, hook2 = FakeHook(), FakeHook()
    hook.request = SessionRunArgs(None, feed_dict={"a": 5})
    hook2.request = SessionRunArgs(None, feed_dict={"b": 10})
    hooked = HookedSession(Session({}), [hook, hook2])
    feed_dict = {"c": 20}
    assert hooked.run(lambda a, b, c: a + b + c, feed_dict=feed_dict) == 35
    assert feed_dict == {"c": 20}  # the user's dict is left alone


def test_hooks_feed_conflicts() -> None:
    hook, hook2 = FakeHook(), FakeHook()
    hook.request = SessionRunArgs(None, feed_dict={"a": 5})
    hook2.request = SessionRunArgs(None, feed_dict={"a": 10})
    hooked = HookedSession(Session({}), [hook, hook2])
    with pytest.raises(
        RuntimeError, match=r"Same tensor is fed by two hooks. Conflict\(s\): \['a'\]"
    ):
        hooked.run(lambda a: a)


def test_hooks_and_user_feed_conflicts() -> None:
    hook, hook2 = FakeHook(), FakeHook()
    hook.request = SessionRunArgs(None, feed_dict={"a": 5})
    hook2.request = SessionRunArgs(None, feed_dict={"b": 10})
    hooked = HookedSession(Session({}), [hook, hook2])
    with pytest.raises(RuntimeError, match="Same tensor is fed by a SessionRunHook and user"):
        hooked.run(lambda a, b: a + b, feed_dict={"b": 3})


def test_run_options_and_metadata_reach_every_hook() -> None:
    hook, hook2 = FakeHook(), FakeHook()
    hook.request = SessionRunArgs(
        None, options={"trace_level": 1, "debug_watch": ["x"], "report_oom": False}
    )
    hook2.request = SessionRunArgs(
        None, options={"trace_level": 3, "debug_watch": ["y"], "report_oom": True}
    )
    hooked = HookedSession(Session({}), [hook, hook2])
    metadata: dict[str, Any] = {}
    user_options = {"timeout_in_ms": 100}
    hooked.run(lambda: None, options=user_options, run_metadata=metadata)
    expected = {
        "timeout_in_ms": 100,
        "trace_level": 3,
        "debug_watch": ["x", "y"],
        "report_oom": True,
    }
    for h in (hook, hook2):
        assert h.last_run_values is not None
        assert h.last_run_values.options == expected
        assert h.last_run_values.run_metadata is metadata
    assert user_options == {"timeout_in_ms": 100}


def test_a_failing_step_skips_after_run_and_the_step_increment() -> None:
    hook = FakeHook()
    sess = Session({})
    hooked = HookedSession(sess, [hook])

    def step() -> None:
        raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        hooked.run(step)
    assert hook.call_counter["before_run"] == 1
    assert hook.call_counter["after_run"] == 0
    assert sess.global_step == 0
    assert not hooked.should_stop()


def test_close_closes_the_raw_session() -> None:
    sess = Session({})
    hooked = HookedSession(sess, [])
    assert hooked.raw_session is sess
    hooked.close()
    assert sess.closed
