"""Errors raised by trainhooks, named after TensorFlow's ``tf.errors`` where the concept exists.

Their meaning inside a monitored session is TensorFlow's (``docs/semantics.md``):

* :class:`OutOfRangeError` (and the built-in ``StopIteration``) end training cleanly:
  hooks' ``end`` runs.
* :class:`AbortedError` and :class:`UnavailableError` are *preemption* errors: a
  ``MonitoredSession`` closes the session, re-creates it (restoring the latest
  checkpoint) and retries the same ``run``.
* :class:`PeerLostError` ends a torch.distributed job: a process of it was lost, did
  not arrive within its timeout, or got out of step. It is not a preemption error: one
  process cannot recover alone while the others wait in a collective.
* :class:`DataLossError` means a checkpoint failed verification; it names the
  checkpoint, the file and the tensor.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "AbortedError",
    "DataLossError",
    "DeadlineExceededError",
    "Error",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PeerLostError",
    "UnavailableError",
    "UnknownError",
]


class Error(Exception):
    """Base class of every error trainhooks raises on its own behalf."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message


class OutOfRangeError(Error):
    """The input is exhausted; a monitored session treats it as a clean end of training."""


class AbortedError(Error):
    """The step was aborted (preemption, lost peer); a ``MonitoredSession`` recovers."""


class UnavailableError(Error):
    """A resource is temporarily unavailable; a ``MonitoredSession`` recovers."""


class PeerLostError(Error, RuntimeError):
    """A process of the torch.distributed job was lost, timed out or got out of step.

    A ``RuntimeError`` too, as torch's own collectives report it.

    Raised on every surviving rank within the checkpoint timeout; the job cannot go on
    (a collective needs every rank), so a monitored session does not recover from it.
    The checkpoints already listed are intact: restart the job to resume.
    """


class DataLossError(Error):
    """A checkpoint is corrupt or truncated; it was not loaded."""


class NotFoundError(Error):
    """A checkpoint, file or entry that was asked for does not exist."""


class InvalidArgumentError(Error):
    """An argument or stored value has the wrong shape, dtype or form."""


class DeadlineExceededError(Error):
    """An operation did not finish within its time limit."""


class UnknownError(Error):
    """An error without a more specific class."""


#: Errors that make a ``MonitoredSession`` re-create its session and retry the run.
PREEMPTION_ERRORS: tuple[type[BaseException], ...] = (AbortedError, UnavailableError)

#: Errors that end training cleanly: hooks' ``end`` is called.
CLEAN_STOP_ERRORS: tuple[type[BaseException], ...] = (OutOfRangeError, StopIteration)


# Errors defined next to the code that raises them, re-exported here lazily (their modules
# import this one): th.errors.CheckpointDirLockedError, th.errors.PreemptedError, ...
_LAZY = {
    "CheckpointDirLockedError": "trainhooks.checkpoint.storage.lock",
    "PreemptedError": "trainhooks.session.preemption",
    "StateMismatchError": "trainhooks.checkpoint.state.tree",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainhooks.errors' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
