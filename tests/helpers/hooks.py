"""Hooks that record or misbehave, and a driver for one hook the way TF's hook tests run it."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from trainhooks.session.coordinator import Coordinator
from trainhooks.session.hooked import HookedSession
from trainhooks.session.run_hook import (
    SessionRunArgs,
    SessionRunContext,
    SessionRunHook,
    SessionRunValues,
)
from trainhooks.session.session import Session


def hooked(
    hook: SessionRunHook, *, step: int = 0, advance: bool = True, state: Any = None
) -> tuple[Session, HookedSession]:
    """A raw Session wrapped in a HookedSession([hook])."""
    raw = Session(state, global_step=step, advance_global_step=advance)
    return raw, HookedSession(raw, [hook])


def log_messages(
    caplog: pytest.LogCaptureFixture, logger: str, level: int = logging.INFO
) -> list[str]:
    """The messages ``logger`` (exactly) logged at ``level``."""
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]


class CountingHook(SessionRunHook):
    """Records every callback in order (``calls``, ``count(name)``); can request a stop
    (``should_stop``) or ask for fetches (``request``)."""

    def __init__(self, request: SessionRunArgs | None = None) -> None:
        self.request = request
        self.should_stop = False
        self.calls: list[str] = []
        self.sessions: list[Session | None] = []
        self.coords: list[Coordinator] = []
        self.results: list[Any] = []

    def count(self, name: str) -> int:
        return self.calls.count(name)

    def begin(self) -> None:
        self.calls.append("begin")

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        self.calls.append("after_create_session")
        self.sessions.append(session)
        self.coords.append(coord)

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        self.calls.append("before_run")
        return self.request

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        self.calls.append("after_run")
        self.results.append(run_values.results)
        if self.should_stop:
            run_context.request_stop()

    def end(self, session: Session) -> None:
        self.calls.append("end")
        self.sessions.append(session)


class RaiseOnceAtCountN(SessionRunHook):
    """Raises ``ex`` in the n-th ``before_run`` (or ``after_run``), counting from 1, once."""

    def __init__(self, n: int, ex: BaseException, *, in_after_run: bool = False) -> None:
        self.n, self.ex, self.in_after_run = n, ex, in_after_run
        self.raised = False
        self.count = 0

    def _maybe_raise(self) -> None:
        self.count += 1
        if self.count == self.n and not self.raised:
            self.raised = True
            raise self.ex

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        if not self.in_after_run:
            self._maybe_raise()
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        if self.in_after_run:
            self._maybe_raise()
