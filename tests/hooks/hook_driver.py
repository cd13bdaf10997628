"""Drive a hook the way TF's hook tests do: a raw Session wrapped in a HookedSession."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from trainhooks.session.hooked import HookedSession
from trainhooks.session.run_hook import SessionRunHook
from trainhooks.session.session import Session


def hooked(
    hook: SessionRunHook, *, step: int = 0, advance: bool = True, state: Any = None
) -> tuple[Session, HookedSession]:
    raw = Session(state, global_step=step, advance_global_step=advance)
    return raw, HookedSession(raw, [hook])


def log_messages(
    caplog: pytest.LogCaptureFixture, logger: str, level: int = logging.INFO
) -> list[str]:
    """The messages ``logger`` (exactly) logged at ``level``."""
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == level]
