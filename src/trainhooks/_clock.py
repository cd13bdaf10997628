"""The clock type that every time-dependent part accepts, so tests can inject time."""

from __future__ import annotations

import time
from collections.abc import Callable

#: A function returning the current time in seconds (``time.time`` by default).
Clock = Callable[[], float]

#: The default wall clock.
wall_clock: Clock = time.time
