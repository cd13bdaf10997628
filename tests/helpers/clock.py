"""A clock the test moves by hand."""

from __future__ import annotations


class FakeClock:
    """A controllable clock: pass it as ``clock=`` and move time with :meth:`advance`."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = now
