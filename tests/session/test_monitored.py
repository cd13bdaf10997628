"""MonitoredSession, SingularMonitoredSession, MonitoredTrainingSession and the session
creators, without checkpoints (ported from TF's monitored_session_test.py)."""

from __future__ import annotations

import re
import threading
from typing import Any

import numpy as np
import pytest
import torch.distributed
from tests.helpers.hooks import CountingHook, RaiseOnceAtCountN

import trainhooks as th
from trainhooks import errors
from trainhooks.session.coordinator import Coordinator
from trainhooks.session.creators import ChiefSessionCreator, Scaffold, WorkerSessionCreator
from trainhooks.session.monitored import (
    MonitoredSession,
    SingularMonitoredSession,
    StepContext,
)
from trainhooks.session.run_hook import (
    SessionRunArgs,
    SessionRunHook,
)
from trainhooks.session.session import Session
from trainhooks.training import MonitoredTrainingSession


class CountingSessionCreator:
    """Counts the sessions a real ChiefSessionCreator makes."""

    def __init__(self, **kwargs: Any) -> None:
        self._creator = ChiefSessionCreator(**kwargs)
        self.number_of_sessions_created = 0

    def create_session(self) -> Session:
        self.number_of_sessions_created += 1
        return self._creator.create_session()


def step() -> dict[str, float]:
    return {"loss": 0.5}


# ---- construction and defaults ---------------------------------------------------------


def test_defaults() -> None:
    with MonitoredSession() as session:
        assert session.run("global_step") == 1
        assert session.run(lambda: 42) == 42


def test_public_names_live_where_the_api_says() -> None:
    assert th.MonitoredSession is MonitoredSession
    assert th.StepContext is StepContext
    assert th.Scaffold is Scaffold
    assert th.Coordinator is Coordinator
    assert th.WorkerSessionCreator is WorkerSessionCreator


def test_hook_call_order_and_counts() -> None:
    hook = CountingHook()
    with MonitoredSession(hooks=[hook]) as session:
        assert hook.calls == ["begin", "after_create_session"]
        session.run(step)
        session.run(step)
    assert hook.calls == [
        "begin",
        "after_create_session",
        "before_run",
        "after_run",
        "before_run",
        "after_run",
        "end",
    ]
    assert hook.sessions[0] is hook.sessions[-1]  # end gets the raw session
    assert isinstance(hook.sessions[0], Session)
    assert isinstance(hook.coords[0], Coordinator)


def test_each_run_is_one_step_and_hooks_see_the_new_step() -> None:
    hook = CountingHook(SessionRunArgs("global_step"))
    with MonitoredSession(hooks=[hook]) as session:
        assert session.run([step, "loss", "global_step"]) == [{"loss": 0.5}, 0.5, 1]
        session.run(step)
    assert hook.results == [1, 2]


def test_scaffold_state_and_init_fn() -> None:
    weights = np.zeros(3)
    calls: list[tuple[Scaffold, Session]] = []

    def init_fn(scaffold: Scaffold, session: Session) -> None:
        calls.append((scaffold, session))
        session.state["w"][:] = 7.0

    scaffold = Scaffold(init_fn=init_fn, state={"w": weights})
    with MonitoredSession(ChiefSessionCreator(scaffold=scaffold)) as session:
        assert session.run("w") is weights
    assert weights.tolist() == [7.0, 7.0, 7.0]
    assert len(calls) == 1 and calls[0][0] is scaffold


def test_scaffold_finalize_creates_the_default_saver_once() -> None:
    from trainhooks.checkpoint.saver import Saver

    scaffold = Scaffold()
    assert scaffold.saver is None and scaffold.init_fn is None and scaffold.summary_op is None
    assert scaffold.finalize() is scaffold
    saver = scaffold.saver
    assert isinstance(saver, Saver)
    assert scaffold.finalize().saver is saver


def test_scaffold_copy_from_scaffold() -> None:
    def init_fn(scaffold: Scaffold, session: Session) -> None:
        session.state["inited_by"] = scaffold

    base = Scaffold(init_fn=init_fn, summary_op="loss", state={"a": 1})
    copy = Scaffold(copy_from_scaffold=base, summary_op={"l": "loss"})
    assert copy.state is base.state
    assert copy.summary_op == {"l": "loss"}
    sess = Session({})
    assert copy.init_fn is not None
    copy.init_fn(sess)
    assert sess.state["inited_by"] is copy  # the user's init_fn, bound to the copy
    with pytest.raises(
        TypeError, match=re.escape("copy_from_scaffold is not a Scaffold instance.")
    ):
        Scaffold(copy_from_scaffold="scaffold")  # type: ignore[arg-type]


def test_state_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="state was given twice"):
        ChiefSessionCreator(scaffold=Scaffold(state={"a": 1}), state={"b": 2})
    with pytest.raises(ValueError, match="state was given twice"):
        MonitoredTrainingSession(scaffold=Scaffold(state={"a": 1}), state={"b": 2})


def test_state_shortcut_with_a_stateless_scaffold() -> None:
    state = {"w": 1.0}
    creator = ChiefSessionCreator(scaffold=Scaffold(summary_op="w"), state=state)
    assert creator.scaffold.summary_op == "w"
    assert creator.create_session().state is state


def test_both_checkpoint_paths_are_refused() -> None:
    with pytest.raises(
        ValueError,
        match=re.escape("Can not provide both checkpoint_dir and checkpoint_filename_with_path."),
    ):
        ChiefSessionCreator(checkpoint_dir="/tmp/a", checkpoint_filename_with_path="/tmp/a/m-1")


def test_worker_initializes_without_a_checkpoint(tmp_path: Any) -> None:
    inits: list[int] = []
    creator = WorkerSessionCreator(
        scaffold=Scaffold(init_fn=lambda s, sess: inits.append(sess.global_step)),
        state={"w": 1.0},
        checkpoint_dir=str(tmp_path),
    )
    sess = creator.create_session()
    assert sess.global_step == 0 and sess.state == {"w": 1.0}
    assert inits == [0]
    assert list(tmp_path.iterdir()) == []  # a worker writes nothing


def test_advance_global_step_false_leaves_the_step_to_the_step_function() -> None:
    with SingularMonitoredSession(state={}, advance_global_step=False) as session:
        raw = session.raw_session()
        assert raw is not None

        def train() -> None:
            raw.global_step += 10

        session.run(train)
        assert session.run("global_step") == 10


# ---- MonitoredTrainingSession without checkpoints ---------------------------------------


def test_mts_without_dirs_runs_only_user_hooks_in_order() -> None:
    chief_hook, user_hook = CountingHook(), CountingHook()
    order: list[str] = []
    chief_hook.begin = lambda: order.append("chief")  # type: ignore[method-assign]
    user_hook.begin = lambda: order.append("user")  # type: ignore[method-assign]
    with MonitoredTrainingSession(
        hooks=[user_hook], chief_only_hooks=[chief_hook], state={"w": 1.0}
    ) as session:
        session.run(step)
    assert order == ["chief", "user"]
    assert session._hooks == [chief_hook, user_hook]


def test_mts_non_chief_runs_no_chief_only_hooks(tmp_path: Any) -> None:
    chief_hook, user_hook = CountingHook(), CountingHook()
    with MonitoredTrainingSession(
        is_chief=False,
        checkpoint_dir=str(tmp_path),
        hooks=[user_hook],
        chief_only_hooks=[chief_hook],
        state={"w": 1.0},
    ) as session:
        session.run(step)
    assert chief_hook.calls == []
    assert user_hook.count("after_run") == 1
    assert list(tmp_path.iterdir()) == []  # no default hook wrote anything


# ---- stopping and closing ---------------------------------------------------------------


def test_hook_requested_stop() -> None:
    hook = CountingHook()
    with MonitoredSession(hooks=[hook]) as session:
        session.run(step)
        assert not session.should_stop()
        hook.should_stop = True
        session.run(step)
        assert session.should_stop()
        with pytest.raises(
            RuntimeError, match=re.escape("Run called even after should_stop requested.")
        ):
            session.run(step)
    assert hook.count("end") == 1


@pytest.mark.parametrize("error", [errors.OutOfRangeError("input done"), StopIteration()])
def test_exit_cleanly_on_clean_stop_errors(error: BaseException) -> None:
    hook = CountingHook()
    raiser = RaiseOnceAtCountN(2, error)
    with MonitoredSession(hooks=[hook, raiser]) as session:
        session.run(step)
        session.run(step)
        pytest.fail("the run above should have stopped training")
    assert session.should_stop()
    assert hook.count("end") == 1
    assert hook.count("after_run") == 1  # none for the stopped step


def test_regular_exception_pass_through_run() -> None:
    hook = CountingHook()
    raiser = RaiseOnceAtCountN(4, RuntimeError("regular exception"))
    with (
        pytest.raises(RuntimeError, match="regular exception"),
        MonitoredSession(hooks=[hook, raiser]) as session,
    ):
        while not session.should_stop():
            session.run(step)
    assert session.should_stop()
    assert session._is_closed()
    assert hook.count("end") == 0


def test_stop_cleanly_when_no_exception_in_with_body() -> None:
    with MonitoredSession() as session:
        session.run(step)
    assert session._is_closed()
    assert session.should_stop()


def test_raises_regular_exceptions_in_with_body() -> None:
    hook = CountingHook()
    with pytest.raises(KeyError, match="body failed"), MonitoredSession(hooks=[hook]) as session:
        session.run(step)
        raise KeyError("body failed")
    assert session._is_closed()
    assert hook.count("end") == 0


def test_close_twice_calls_end_with_none_then_raises() -> None:
    hook = CountingHook()
    session = MonitoredSession(hooks=[hook])
    raw = session._tf_sess()
    session.close()
    assert raw is not None and raw.closed
    with pytest.raises(RuntimeError, match=re.escape("Session is already closed.")):
        session.close()
    assert hook.count("end") == 2
    assert hook.sessions[-2:] == [raw, None]
    with pytest.raises(RuntimeError, match="closed session"):
        session.run(step)


def test_a_failing_end_still_closes_the_session() -> None:
    class FailingEnd(SessionRunHook):
        def end(self, session: Session) -> None:
            raise ValueError("end failed")

    session = MonitoredSession(hooks=[FailingEnd()])
    raw = session._tf_sess()
    with pytest.raises(ValueError, match="end failed"):
        session.close()
    assert session._is_closed() and raw is not None and raw.closed


def test_close_joins_threads_registered_with_the_coordinator() -> None:
    class ThreadHook(SessionRunHook):
        def after_create_session(self, session: Session, coord: Coordinator) -> None:
            self.thread = threading.Thread(target=coord.wait_for_stop, daemon=True)
            coord.register_thread(self.thread)
            self.thread.start()

    hook = ThreadHook()
    with MonitoredSession(hooks=[hook]) as session:
        session.run(step)
        assert hook.thread.is_alive()
    assert not hook.thread.is_alive()


# ---- recovery ----------------------------------------------------------------------------


def test_retry_initialization_on_aborted_error() -> None:
    attempts: list[int] = []

    def init_fn(scaffold: Scaffold, session: Session) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise errors.AbortedError("preempted during init")

    creator = CountingSessionCreator(scaffold=Scaffold(init_fn=init_fn))
    with MonitoredSession(creator) as session:
        assert session.run("global_step") == 1
    assert creator.number_of_sessions_created == 2


def test_a_preemption_in_after_create_session_recreates() -> None:
    class AbortOnFirstCreate(SessionRunHook):
        def __init__(self) -> None:
            self.creates = 0

        def after_create_session(self, session: Session, coord: Coordinator) -> None:
            self.creates += 1
            if self.creates == 1:
                raise errors.UnavailableError("peer gone")

    hook = AbortOnFirstCreate()
    with MonitoredSession(hooks=[hook]) as session:
        session.run(step)
    assert hook.creates == 2


@pytest.mark.parametrize(
    "error",
    [
        errors.AbortedError("Abort"),
        errors.UnavailableError("Unavailable"),
        torch.distributed.DistNetworkError("lost peer"),
        torch.distributed.DistBackendError("NCCL communicator aborted"),
    ],
    ids=["aborted", "unavailable", "dist-network", "dist-backend"],
)
def test_retry_on_preemption_errors(error: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    hook = CountingHook()
    raiser = RaiseOnceAtCountN(4, error)
    with caplog.at_level("INFO"), MonitoredSession(hooks=[hook, raiser]) as session:
        assert session.run("global_step") == 1
        assert session.run("global_step") == 2
        assert session.run("global_step") == 3
        assert not session.should_stop()
        # The 4th run raises: the session is re-created (re-initialized, no checkpoint:
        # step 0) and the same run is retried.
        assert session.run("global_step") == 1
        assert raiser.raised
        assert session.run("global_step") == 2
        assert not session.should_stop()
    assert hook.count("begin") == 1
    assert hook.count("after_create_session") == 2
    assert hook.count("before_run") == 6  # the failed attempt's before_run, then the retry
    assert hook.count("after_run") == 5
    assert hook.count("end") == 1
    first_raw, second_raw = hook.sessions[0], hook.sessions[1]
    assert first_raw is not second_raw and first_raw is not None and first_raw.closed
    assert hook.sessions[-1] is second_raw  # end() gets the new raw session
    assert "This may be due to a preemption" in caplog.text


def test_other_runtime_errors_from_torch_are_not_preemption() -> None:
    raiser = RaiseOnceAtCountN(1, RuntimeError("CUDA error: out of memory"))
    with (
        pytest.raises(RuntimeError, match="out of memory"),
        MonitoredSession(hooks=[raiser]) as session,
    ):
        session.run(step)


def test_singular_session_does_not_handle_aborted_error() -> None:
    hook = CountingHook()
    raiser = RaiseOnceAtCountN(2, errors.AbortedError("Abort"))
    with (
        pytest.raises(errors.AbortedError),
        SingularMonitoredSession(hooks=[hook, raiser]) as session,
    ):
        session.run(step)
        session.run(step)
    assert hook.count("after_create_session") == 1
    assert hook.count("end") == 0
    assert session.raw_session() is None


def test_singular_raw_session() -> None:
    state = {"w": np.ones(2)}
    with SingularMonitoredSession(state=state) as session:
        raw = session.raw_session()
        assert isinstance(raw, Session) and raw.state is state
    assert session.raw_session() is None


# ---- the coordinator inside a monitored session -----------------------------------------


def _report_from_thread(coord: Coordinator, error: BaseException) -> None:
    thread = threading.Thread(target=lambda: coord.request_stop(error))
    thread.start()
    thread.join()


def test_recovery_from_coordinator_exception() -> None:
    hook = CountingHook()
    creator = CountingSessionCreator()
    session = MonitoredSession(creator, [hook])
    assert creator.number_of_sessions_created == 1
    assert not session.should_stop()
    _report_from_thread(hook.coords[-1], errors.AbortedError("Aborted"))
    # A preemption reported by a thread re-creates the session; training goes on.
    assert not session.should_stop()
    assert creator.number_of_sessions_created == 2
    assert hook.count("after_create_session") == 2
    session.close()


def test_recovery_from_non_preemption_in_coordinator() -> None:
    hook = CountingHook()
    creator = CountingSessionCreator()
    session = MonitoredSession(creator, [hook])
    _report_from_thread(hook.coords[-1], errors.UnknownError("Some fatal error"))
    assert session.should_stop()
    assert creator.number_of_sessions_created == 1
    with pytest.raises(errors.UnknownError, match="Some fatal error"):
        session.close()
    assert session._is_closed()


def test_regular_exception_reported_to_coord_pass_through_run() -> None:
    hook = CountingHook()
    run_performed_without_error = False
    with (
        pytest.raises(RuntimeError, match="a thread wants to stop"),
        MonitoredSession(hooks=[hook]) as session,
    ):
        session.run(step)
        _report_from_thread(hook.coords[-1], RuntimeError("a thread wants to stop"))
        session.run(step)  # runs normally; the error surfaces at close
        run_performed_without_error = True
    assert run_performed_without_error


def test_regular_exception_reported_to_coord_stops_and_raises_in_singular() -> None:
    hook = CountingHook()
    session = SingularMonitoredSession(hooks=[hook])
    _report_from_thread(hook.coords[-1], ValueError("thread failed"))
    with pytest.raises(ValueError, match="thread failed"):
        session.should_stop()
    with pytest.raises(ValueError, match="thread failed"):
        session.close()


def test_preemption_in_coordinator_replaces_the_run_error_and_recovers() -> None:
    hook = CountingHook()
    failures: list[int] = []

    def flaky_step() -> int:
        if not failures:
            failures.append(1)
            _report_from_thread(hook.coords[-1], errors.AbortedError("peer lost"))
            raise ValueError("consequence of the lost peer")
        return 1

    with MonitoredSession(hooks=[hook]) as session:
        assert session.run(flaky_step) == 1
    assert hook.count("after_create_session") == 2


# ---- run_step_fn -------------------------------------------------------------------------


def test_step_fn_example() -> None:
    hook = CountingHook()
    with MonitoredSession(hooks=[hook]) as session:

        def step_fn(step_context: StepContext) -> Any:
            assert isinstance(step_context.session, Session)
            # The raw session: no hooks, no step.
            assert step_context.session.run("global_step") == 0
            return step_context.run_with_hooks([step, "global_step"])

        assert session.run_step_fn(step_fn) == [{"loss": 0.5}, 1]
    assert hook.count("before_run") == 1 and hook.count("after_run") == 1


def test_step_fn_as_a_method() -> None:
    class Trainer:
        def step_fn(self, step_context: StepContext) -> int:
            return int(step_context.run_with_hooks("global_step"))

    with MonitoredSession() as session:
        assert session.run_step_fn(Trainer().step_fn) == 1


def test_step_fn_signature_is_checked() -> None:
    with MonitoredSession() as session:
        with pytest.raises(ValueError, match=r"may either have one `step_context` argument"):
            session.run_step_fn(lambda ctx, extra: None)  # type: ignore[arg-type, misc]
        with pytest.raises(ValueError, match=r"Got \('context',\) instead"):
            session.run_step_fn(lambda context: None)


def test_step_request_stop_without_a_with_block() -> None:
    session = MonitoredSession()

    def step_fn(step_context: StepContext) -> None:
        step_context.request_stop()

    with pytest.raises(
        StopIteration, match=re.escape("step_fn has requested the iterations to stop.")
    ):
        session.run_step_fn(step_fn)
    assert not session.should_stop()
    session.close()


def test_step_request_stop_in_a_loop_ends_the_with_block_cleanly() -> None:
    hook = CountingHook()
    with MonitoredSession(hooks=[hook]) as session:
        while not session.should_stop():

            def step_fn(step_context: StepContext) -> int:
                step_context.request_stop()
                return 3  # lost: request_stop raises

            session.run_step_fn(step_fn)
            pytest.fail("request_stop should have ended the loop")
    assert hook.count("end") == 1


def test_step_fn_with_hooks_and_request_stop() -> None:
    hook = CountingHook()
    with MonitoredSession(hooks=[hook]) as session:
        hook.should_stop = True
        value = session.run_step_fn(lambda step_context: step_context.run_with_hooks(step))
        assert value == {"loss": 0.5}
        assert session.should_stop()


def test_recovers_from_an_exception_in_step_fn() -> None:
    hook = CountingHook()
    trace: list[int] = []

    def step_fn(step_context: StepContext) -> int:
        trace.append(step_context.session.global_step)
        if len(trace) == 1:
            raise errors.AbortedError("preempted inside step_fn")
        return int(step_context.run_with_hooks("global_step"))

    with MonitoredSession(hooks=[hook]) as session:
        assert session.run_step_fn(step_fn) == 1
    assert trace == [0, 0]
    assert hook.count("after_create_session") == 2
    # The retried step_fn got the new raw session, not the closed one.
    assert hook.sessions[1] is not hook.sessions[0]


def test_recovers_from_an_exception_in_step_fn_after_hooks() -> None:
    hook = CountingHook()
    calls: list[int] = []

    def step_fn(step_context: StepContext) -> int:
        value = int(step_context.run_with_hooks("global_step"))
        calls.append(value)
        if len(calls) == 1:
            raise errors.AbortedError("preempted after the hooked run")
        return value

    with MonitoredSession(hooks=[hook]) as session:
        assert session.run_step_fn(step_fn) == 1  # re-initialized, then the step again
    assert calls == [1, 1]
    assert hook.count("after_run") == 2


def test_step_fn_exception_from_before_run_recovers() -> None:
    raiser = RaiseOnceAtCountN(1, errors.AbortedError("abort in before_run"))
    with MonitoredSession(hooks=[raiser]) as session:
        assert session.run_step_fn(lambda step_context: step_context.run_with_hooks(step)) == {
            "loss": 0.5
        }
    assert raiser.raised


def test_step_fn_in_singular_session_does_not_recover() -> None:
    with SingularMonitoredSession() as session:

        def step_fn(step_context: StepContext) -> None:
            raise errors.AbortedError("no recovery here")

        with pytest.raises(errors.AbortedError):
            session.run_step_fn(step_fn)


def test_an_unsupported_state_entry_is_refused_at_creation() -> None:
    with pytest.raises(TypeError, match=r"state\['callback'\] has unsupported type"):
        MonitoredTrainingSession(state={"w": np.ones(2), "callback": print})
    with pytest.raises(TypeError, match=r"state\['callback'\]"):
        WorkerSessionCreator(state={"callback": print})
