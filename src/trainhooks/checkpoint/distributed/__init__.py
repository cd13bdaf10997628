"""Many processes, one checkpoint: the process group a save runs in.

* ``group.py``: the ``ProcessGroup`` Protocol (rank, world size, JSON messages between
  ranks, never pickle) and ``SINGLE_PROCESS``, the group of one that a plain
  one-process save runs in, so that one process and a job of many take the same path.
"""

from trainhooks.checkpoint.distributed.group import SINGLE_PROCESS, ProcessGroup, SingleProcess

__all__ = ["SINGLE_PROCESS", "ProcessGroup", "SingleProcess"]
