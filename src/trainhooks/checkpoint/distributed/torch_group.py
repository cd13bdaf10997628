"""``TorchProcessGroup``: the ranks of a torch.distributed job as a checkpoint ``ProcessGroup``.

Checkpoint traffic runs on a gloo group of its own, created with its own timeout, so
that a background save's collectives never interleave with the training loop's (NCCL
or gloo) and a lost peer ends in an error within that timeout instead of torch's
30-minute default. Messages are JSON values carried as ``uint8`` tensors (the lengths
first, then the padded bytes): never pickle, unlike torch's object collectives. Every
message carries the sender's sequence number and the operation, so ranks that got out
of step fail at once with both named, instead of exchanging the wrong messages.

Only one thread uses the group at a time: a ``Saver`` runs one save at a time, and a
restore waits for the save in flight.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from typing import Any

from trainhooks import errors
from trainhooks.checkpoint.distributed.group import Json

__all__ = ["CheckpointGroupError", "TorchProcessGroup"]

#: How long a checkpoint collective may wait for the slowest rank.
DEFAULT_TIMEOUT_SECS = 600.0


class CheckpointGroupError(errors.PeerLostError):
    """A checkpoint collective failed: a peer was lost, timed out or got out of step."""


class TorchProcessGroup:
    """The ranks of the current torch.distributed job, for checkpoint operations.

    Every rank must create it at the same point (it creates a gloo group, a collective
    of its own), after ``torch.distributed.init_process_group``.

    Args:
      timeout_secs: how long one checkpoint collective waits for the slowest rank
        before every rank fails with :class:`CheckpointGroupError`.
      coordinator: the job rank that coordinates (chooses, commits, keeps the state
        file): the chief. In this group it is rank 0, the others following in job
        order, so :attr:`rank` is the job rank only when the coordinator is job rank 0.
      group: a gloo process group of every rank to use instead of creating one (one
        thread at a time must use it).

    Raises:
      RuntimeError: torch.distributed is not initialized.

    Example:
        >>> group = TorchProcessGroup(timeout_secs=300)  # doctest: +SKIP
        >>> saver = Saver(process_group=group)  # doctest: +SKIP
    """

    def __init__(
        self, timeout_secs: float = DEFAULT_TIMEOUT_SECS, *, coordinator: int = 0, group: Any = None
    ) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchProcessGroup needs torch.distributed initialized: call "
                "torch.distributed.init_process_group(...) on every rank first."
            )
        self._dist = dist
        self._timeout_secs = float(timeout_secs)
        self._group = (
            dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_secs))
            if group is None
            else group
        )
        self._world_size = dist.get_world_size()
        if not 0 <= coordinator < self._world_size:
            raise ValueError(
                f"coordinator must be a rank of the job, 0 to {self._world_size - 1}; "
                f"got {coordinator!r}."
            )
        self._coordinator = int(coordinator)
        self._job_rank = dist.get_rank()
        # Ranks counted from the coordinator: rank 0 of this group coordinates.
        self._rank = (self._job_rank - self._coordinator) % self._world_size
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def rank(self) -> int:
        """This process's rank in the job."""
        return self._rank

    @property
    def job_rank(self) -> int:
        """This process's rank in the torch.distributed job (``torch.distributed.get_rank()``)."""
        return self._job_rank

    @property
    def world_size(self) -> int:
        """How many processes the job has."""
        return self._world_size

    def broadcast(self, value: Json) -> Json:
        """The coordinator's ``value`` on every rank (other ranks pass None)."""
        import torch

        def run() -> Json:
            payload = self._encode("broadcast", value) if self._rank == 0 else b""
            length = torch.tensor([len(payload)], dtype=torch.int64)
            self._dist.broadcast(length, src=self._coordinator, group=self._group)
            data = torch.zeros(int(length.item()), dtype=torch.uint8)
            if self._rank == 0:
                data.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
            self._dist.broadcast(data, src=self._coordinator, group=self._group)
            return self._decode("broadcast", bytes(data.numpy()), sender=self._coordinator)

        return self._collective("broadcast", run)

    def gather(self, value: Json) -> list[Json] | None:
        """Every rank's ``value`` in rank order on the coordinator; None elsewhere."""
        values = self._all_gather(value)
        return values if self._rank == 0 else None

    def all_gather(self, value: Json) -> list[Json]:
        """Every rank's ``value`` on every rank, the coordinator's first."""
        return self._all_gather(value)

    def barrier(self) -> None:
        """Return once every rank has called it (or fail within the timeout)."""
        self._collective("barrier", lambda: self._dist.barrier(group=self._group))

    def _all_gather(self, value: Json) -> list[Json]:
        import torch

        def run() -> list[Json]:
            payload = self._encode("gather", value)
            length = torch.tensor([len(payload)], dtype=torch.int64)
            lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self._world_size)]
            self._dist.all_gather(lengths, length, group=self._group)
            size = max(int(n.item()) for n in lengths)
            mine = torch.zeros(size, dtype=torch.uint8)
            mine[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            gathered = [torch.zeros(size, dtype=torch.uint8) for _ in range(self._world_size)]
            self._dist.all_gather(gathered, mine, group=self._group)
            in_job_order = [
                self._decode("gather", bytes(data[: int(n.item())].numpy()), sender=rank)
                for rank, (data, n) in enumerate(zip(gathered, lengths))
            ]
            c = self._coordinator
            return in_job_order[c:] + in_job_order[:c]

        result: list[Json] = self._collective("gather", run)
        return result

    def _collective(self, op: str, run: Any) -> Any:
        with self._lock:
            self._seq += 1
            start = time.monotonic()
            try:
                return run()
            except CheckpointGroupError:
                raise
            except RuntimeError as e:  # gloo reports a lost or late peer as a RuntimeError
                raise CheckpointGroupError(
                    f"Checkpoint {op} #{self._seq} on rank {self._job_rank} of {self._world_size} "
                    f"failed after {time.monotonic() - start:.1f} s (timeout "
                    f"{self._timeout_secs:g} s): a peer was lost or did not arrive: {e}"
                ) from e

    def _encode(self, op: str, value: Json) -> bytes:
        message = {"seq": self._seq, "op": op, "value": value}
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()

    def _decode(self, op: str, payload: bytes, *, sender: int) -> Json:
        message = json.loads(payload)
        if message.get("seq") != self._seq or message.get("op") != op:
            raise CheckpointGroupError(
                f"Checkpoint ranks out of step: rank {self._job_rank} is at {op} #{self._seq}, "
                f"rank {sender} sent {message.get('op')} #{message.get('seq')}."
            )
        return message["value"]

    def __repr__(self) -> str:
        return (
            f"TorchProcessGroup(rank={self._job_rank}, world_size={self._world_size}, "
            f"coordinator={self._coordinator})"
        )
