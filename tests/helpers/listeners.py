"""The recording ``CheckpointSaverListener`` of the hook and session tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainhooks.hooks.checkpoint import CheckpointSaverListener


class RecordingListener(CheckpointSaverListener):
    """Records every call and counts them (TF's ``MockCheckpointSaverListener``).

    ``events`` gets ``begin``, ``bs<step>``, ``as<step>`` and ``end<step>``, each after
    ``name`` (pass one list to several listeners to see their order); ``get_counts()``
    counts the calls. ``after_save`` first runs ``check(listener, step)`` (to look at the
    checkpoint as a user would), then asks the hook to stop when ``ask_for_stop`` is set
    or the step is ``stop_at``.
    """

    def __init__(
        self,
        events: list[Any] | None = None,
        name: str = "",
        *,
        stop_at: int | None = None,
        check: Callable[[RecordingListener, int], None] | None = None,
    ) -> None:
        self.events: list[Any] = [] if events is None else events
        self.prefix = name
        self.stop_at = stop_at
        self.check = check
        self.ask_for_stop = False
        self.begin_count = 0
        self.before_save_count = 0
        self.after_save_count = 0
        self.end_count = 0

    def begin(self) -> None:
        self.begin_count += 1
        self.events.append(f"{self.prefix}begin")

    def before_save(self, session: Any, global_step_value: int) -> None:
        self.before_save_count += 1
        self.events.append(f"{self.prefix}bs{global_step_value}")

    def after_save(self, session: Any, global_step_value: int) -> bool:
        self.after_save_count += 1
        if self.check is not None:
            self.check(self, global_step_value)
        self.events.append(f"{self.prefix}as{global_step_value}")
        return self.ask_for_stop or self.stop_at == global_step_value

    def end(self, session: Any, global_step_value: int) -> None:
        self.end_count += 1
        self.events.append(f"{self.prefix}end{global_step_value}")

    def get_counts(self) -> dict[str, int]:
        return {
            "begin": self.begin_count,
            "before_save": self.before_save_count,
            "after_save": self.after_save_count,
            "end": self.end_count,
        }
