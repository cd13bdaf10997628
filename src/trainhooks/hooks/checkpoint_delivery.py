"""How ``CheckpointSaverHook`` delivers a background save to its listeners.

With background saving (``docs/internals.md``) ``Saver.save`` returns once the state is copied and
the checkpoint commits later, on another thread. Listeners must still run on the
training thread, and only for a complete checkpoint: the hook records the save it
started in a :class:`CommitDelivery`, which, at every step boundary, asks the saver
which saves committed (``Saver.poll_committed``) and calls the hook's ``after_save``
half for this one. A failed save is raised there, or handed to the hook's logger
(``on_save_error="log"``), and gets no ``after_save``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.session.run_hook import SessionRunContext
    from trainhooks.session.session import Session

__all__ = ["CommitDelivery", "InFlightSave"]


class InFlightSave(NamedTuple):
    """A background save the hook started, whose ``after_save`` is still to come."""

    prefix: str
    step: int
    can_stop: bool  # saved in after_run: a listener's stop request counts


class CommitDelivery:
    """The background save a hook started, until its listeners have heard of its commit.

    It keeps no reference to the hook (the hook passes its callbacks to :meth:`deliver`),
    so a hook and its saver are freed as soon as the session lets go of them.

    Example:
        >>> delivery = CommitDelivery()
        >>> delivery.start("/tmp/ckpt/model.ckpt-10", 10, can_stop=True)
        >>> delivery.in_flight.prefix
        '/tmp/ckpt/model.ckpt-10'
    """

    def __init__(self) -> None:
        self.in_flight: InFlightSave | None = None

    def start(self, prefix: str, step: int, *, can_stop: bool) -> None:
        """Remember the save of ``step`` just handed to the saver as ``prefix``.

        Args:
          prefix: what ``Saver.save`` returned.
          step: the step saved.
          can_stop: the save was made in ``after_run``: a listener may stop training.
        """
        self.in_flight = InFlightSave(prefix, step, can_stop)

    def deliver(
        self,
        saver: Saver,
        session: Session,
        run_context: SessionRunContext | None,
        *,
        after_commit: Callable[[Session, int, str | None], bool],
        on_failure: Callable[[int, Exception], None] | None,
        wait: bool = False,
    ) -> None:
        """At a step boundary: ``after_save`` for the save in flight, once it committed.

        With ``wait`` it blocks until the save in flight is done. A failed save is
        raised here (or passed to ``on_failure``). A stop requested by a listener
        counts only for a save made in ``after_run`` and only where there is a
        ``run_context`` to stop.

        Args:
          saver: the saver the save was made with.
          session: passed to the listeners.
          run_context: the step's context, or None outside a step.
          after_commit: ``after_commit(session, step, prefix) -> bool``: the listeners'
            ``after_save`` for a committed checkpoint; True if one asked to stop.
          on_failure: ``on_failure(step, error)`` for a failed save, which is then not
            raised (``on_save_error="log"``); None raises it.
          wait: block until the save in flight commits or fails.
        """
        in_flight = self.in_flight
        if in_flight is None:
            return
        try:
            if wait:
                saver.wait()
            committed = saver.poll_committed()
        except Exception as e:
            self.in_flight = None
            if on_failure is None:
                raise
            on_failure(in_flight.step, e)
            return
        for done in committed:
            if done.prefix != in_flight.prefix:
                continue  # a save someone else made with the same saver
            self.in_flight = None
            should_stop = after_commit(session, done.global_step, done.prefix)
            if should_stop and in_flight.can_stop and run_context is not None:
                run_context.request_stop()
