"""The hook protocol: :class:`SessionRunHook` and the values that flow through it.

Call order inside a monitored session (see ``MonitoredSession``)::

    hook.begin()                                  # once, before any session exists
    hook.after_create_session(session, coord)     # on every (re)creation
    for each run():
        args = hook.before_run(run_context)       # every hook, in order
        ... the step runs ...
        hook.after_run(run_context, run_values)   # every hook, in order; skipped on error
    hook.end(session)                             # on a clean close only
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from trainhooks.session.coordinator import Coordinator
    from trainhooks.session.session import Session

__all__ = ["SessionRunArgs", "SessionRunContext", "SessionRunHook", "SessionRunValues"]


class SessionRunHook:
    """Base class for hooks that act around the steps of a monitored session.

    Every method does nothing by default; override the ones you need.

    Example:
        >>> import trainhooks as th
        >>> class PrintLoss(th.SessionRunHook):
        ...     def before_run(self, run_context):
        ...         return th.SessionRunArgs("loss")       # ask for the step's loss
        ...     def after_run(self, run_context, run_values):
        ...         print("loss", run_values.results)
    """

    def begin(self) -> None:
        """Called once, before the first session is created."""

    def after_create_session(self, session: Session, coord: Coordinator) -> None:
        """Called each time a session is created, including after recovery.

        Args:
          session: the raw :class:`~trainhooks.Session` (its ``run`` calls no hooks).
          coord: the session's :class:`~trainhooks.Coordinator`.
        """

    def before_run(self, run_context: SessionRunContext) -> SessionRunArgs | None:
        """Called before each ``run``; may return :class:`SessionRunArgs` to add fetches or feeds."""
        return None

    def after_run(self, run_context: SessionRunContext, run_values: SessionRunValues) -> None:
        """Called after each successful ``run``; not called when the run raised."""

    def end(self, session: Session) -> None:
        """Called when the session closes cleanly (also after ``OutOfRangeError``/``StopIteration``)."""


class SessionRunArgs(NamedTuple):
    """What a hook adds to a ``run``: fetches (names or callables, nested), feeds and options."""

    fetches: Any
    feed_dict: Mapping[str, Any] | None = None
    options: Mapping[str, Any] | None = None


class SessionRunValues(NamedTuple):
    """What a hook gets back: ``results`` mirrors the fetches it asked for (None if none)."""

    results: Any
    options: dict[str, Any]
    run_metadata: dict[str, Any]


class SessionRunContext:
    """The context of one ``run`` call, shared by every hook's ``before_run`` and ``after_run``.

    Args:
      original_args: the caller's fetches and feeds, as a :class:`SessionRunArgs`.
      session: the raw session; calling ``session.run`` from a hook triggers no hooks.
    """

    __slots__ = ("_original_args", "_session", "_stop_requested")

    def __init__(self, original_args: SessionRunArgs, session: Session) -> None:
        self._original_args = original_args
        self._session = session
        self._stop_requested = False

    @property
    def original_args(self) -> SessionRunArgs:
        """The :class:`SessionRunArgs` of the caller's ``run`` (fetches and feeds)."""
        return self._original_args

    @property
    def session(self) -> Session:
        """The raw session: running it from a hook calls no hooks."""
        return self._session

    @property
    def stop_requested(self) -> bool:
        """True once a hook called :meth:`request_stop` during this run."""
        return self._stop_requested

    def request_stop(self) -> None:
        """Ask the session to stop after this run; ``should_stop()`` then returns True."""
        self._stop_requested = True
