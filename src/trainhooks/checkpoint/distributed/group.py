"""The process group a checkpoint operation runs in: who writes, who commits.

A save with many writers runs the same code on every rank::

    (coordinator) begin the staging place          -> broadcast it
    (all ranks)   write their share of data files  -> gather what each wrote
    (coordinator) merge into one manifest, commit  -> broadcast the outcome
    (all ranks)   return, or raise the same error

``ProcessGroup`` is all that code needs of a job: a rank, a world size, and a few
collectives whose messages are JSON values (never pickle: a message from another
process is data, not code). :data:`SINGLE_PROCESS` is the group of one; its
collectives return at once, so a one-process save costs nothing extra.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["SINGLE_PROCESS", "ProcessGroup", "SingleProcess"]

#: A message between ranks: JSON values only (dict, list, str, int, float, bool, None).
Json = Any


@runtime_checkable
class ProcessGroup(Protocol):
    """The ranks that take part in one checkpoint operation; rank 0 coordinates."""

    @property
    def rank(self) -> int:
        """This process's rank, 0 to ``world_size - 1``."""
        ...

    @property
    def world_size(self) -> int:
        """How many processes take part."""
        ...

    def broadcast(self, value: Json) -> Json:
        """The coordinator's ``value`` on every rank (other ranks pass None)."""
        ...

    def gather(self, value: Json) -> list[Json] | None:
        """Every rank's ``value`` in rank order on the coordinator; None elsewhere."""
        ...

    def barrier(self) -> None:
        """Return once every rank has called it."""
        ...


class SingleProcess:
    """The group of one process: every collective returns at once.

    Example:
        >>> SINGLE_PROCESS.gather({"files": 1})
        [{'files': 1}]
        >>> SINGLE_PROCESS.broadcast("ckpt/model.ckpt-1.tmp-0123456789ab")
        'ckpt/model.ckpt-1.tmp-0123456789ab'
    """

    rank = 0
    world_size = 1

    def broadcast(self, value: Json) -> Json:
        return value

    def gather(self, value: Json) -> list[Json] | None:
        return [value]

    def barrier(self) -> None:
        pass

    def __repr__(self) -> str:
        return "SINGLE_PROCESS"


#: The group a save runs in when nobody passes one.
SINGLE_PROCESS = SingleProcess()
