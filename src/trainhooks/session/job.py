"""A monitored session as one process of a torch.distributed job.

When ``torch.distributed`` is initialized before a monitored session is created (or
``MonitoredTrainingSession(master=...)`` names an init method), the session forms a
:class:`Job` first, on every rank, in lockstep:

1. every rank waits for the others, at most ``max_wait_secs`` (TensorFlow's
   ``DeadlineExceededError`` message when one never arrives);
2. the ranks agree on one chief: the one rank passing ``is_chief=True``, else rank 0
   when it left ``is_chief`` unset; two chiefs, or none, is an error on every rank;
3. every rank must pass the same checkpoint directory and the same state entries; a
   difference is an error on every rank that names the ranks and what differs;
4. the session's savers join the job's checkpoint group (``TorchProcessGroup``, gloo,
   its own timeout): the chief alone chooses the checkpoint to restore, every rank
   restores it or initializes, and every save is written by all ranks and committed
   once by the chief;
5. a readiness barrier, again within ``max_wait_secs``.

**Step boundaries.** Two decisions must be the job's, not one rank's: a save every N
seconds (only the chief's clock counts) and a stop after a termination signal that
reached one rank. The ranks agree on both at *check steps*: one ``all_reduce`` of a few
integers on a gloo group of the job's own. Every rank knows the next check step
(the chief chooses it, about :data:`CHECK_INTERVAL_SECS` ahead at the current step
rate, and announces it in the same reduction), so between checks a step costs one
integer comparison and no collective. Save decisions agreed at a check take effect at
the next step's ``after_run`` on every rank; an agreed stop makes every rank stop
before the next step and save that step once.

**Peer loss.** A collective whose peer is gone raises a plain ``RuntimeError`` in gloo
and NCCL (:func:`is_peer_loss` recognises them). In a job the session turns such an
error into :class:`~trainhooks.errors.PeerLostError` and does not recover: one rank
cannot re-create its session while the others wait in a collective.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from trainhooks import errors
from trainhooks.checkpoint.distributed.torch_group import DEFAULT_TIMEOUT_SECS, TorchProcessGroup
from trainhooks.checkpoint.replicas import replica_digests

if TYPE_CHECKING:
    from trainhooks.session.preemption import PreemptionWatcher

__all__ = [
    "CHECK_INTERVAL_SECS",
    "Job",
    "form_job",
    "in_job",
    "init_from_master",
    "is_peer_loss",
]

logger = logging.getLogger(__name__)

#: About how often, in seconds, the ranks agree on save and stop decisions.
CHECK_INTERVAL_SECS = 0.5
#: The most steps between two agreements, however fast the steps (steps that slow down
#: after a fast stretch must still reach a check within a signal's grace period).
MAX_STEPS_BETWEEN_CHECKS = 1_000

# What gloo and NCCL put in the RuntimeError of a collective whose peer is gone or late
# (gloo's messages name its transport's source file, "gloo/transport/tcp/pair.cc: ...").
_PEER_LOSS_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "gloo/transport",
    "Gloo connectFullMesh failed",
    "NCCL communicator was aborted",
    "ncclRemoteError",
    "ncclSystemError",
)


def _dist() -> Any | None:
    """``torch.distributed`` if torch is already imported and it is usable, else None."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return None
    return dist


def in_job() -> bool:
    """True in a torch.distributed job of more than one process (torch already imported)."""
    dist = _dist()
    return dist is not None and dist.is_initialized() and dist.get_world_size() > 1


def init_from_master(master: str, *, timeout_secs: float) -> None:
    """Initialize torch.distributed from an init method, as ``master=`` asks.

    ``""`` (TensorFlow's in-process target) does nothing; ``"env://"`` reads
    ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK`` and ``WORLD_SIZE`` (what torchrun sets);
    ``"tcp://host:port"`` and ``"file:///path"`` take ``RANK`` and ``WORLD_SIZE`` from the
    environment. The backend is torch's default for the machine (gloo on CPU, NCCL for
    CUDA tensors), the timeout ``timeout_secs``. Already initialized: nothing to do.

    Any other value (a TensorFlow session target) is accepted and unused, as before.

    Raises:
      ValueError: ``tcp://`` or ``file://`` without ``RANK`` and ``WORLD_SIZE`` set.
    """
    if not master.startswith(("env://", "tcp://", "file://")):
        if master:
            logger.info("master=%r is not a torch.distributed init method; unused.", master)
        return
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return
    kwargs: dict[str, Any] = {"init_method": master, "timeout": timedelta(seconds=timeout_secs)}
    if not master.startswith("env://"):
        for name in ("RANK", "WORLD_SIZE"):
            if name not in os.environ:
                raise ValueError(
                    f"master={master!r} needs {name} in the environment (torchrun sets it), "
                    "or initialize torch.distributed yourself before creating the session."
                )
        kwargs.update(rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(**kwargs)
    logger.info("Initialized torch.distributed from %s: rank %d", master, dist.get_rank())


def is_peer_loss(error: BaseException) -> bool:
    """Whether ``error`` is how torch.distributed reports a lost or late peer.

    torch raises ``DistError`` subclasses for some of these and a plain ``RuntimeError``
    naming the transport for the rest (gloo's "Connection closed by peer", a timeout).
    """
    dist = _dist()
    dist_error = getattr(dist, "DistError", None) if dist is not None else None
    if isinstance(dist_error, type) and isinstance(error, dist_error):
        return True
    if isinstance(error, errors.PeerLostError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(m in text for m in _PEER_LOSS_MARKERS)


class Job:
    """This process's place in a torch.distributed job, for a monitored session.

    Made by :func:`form_job` on every rank at once; see the module docstring for what
    forming it checks.

    Attributes:
      rank: this process's rank in the job.
      world_size: how many processes the job has.
      chief_rank: the rank of the chief (restores the choice, commits, summarizes).
      checkpoint_group: the group the session's savers save and restore with.
    """

    def __init__(
        self,
        dist: Any,
        control: Any,
        *,
        chief_rank: int,
        timeout_secs: float,
    ) -> None:
        self._dist = dist
        self._control = control
        self.rank: int = dist.get_rank()
        self.world_size: int = dist.get_world_size()
        self.chief_rank = chief_rank
        self._timeout_secs = timeout_secs
        self.checkpoint_group = TorchProcessGroup(timeout_secs, coordinator=chief_rank)
        self._votes: list[Callable[[int], bool]] = []
        self._agreed_saves: list[bool] = []
        self._preemption: PreemptionWatcher | None = None
        self._stop_vote = False
        #: True once the ranks agreed to stop (a listener of the chief asked to)
        self.stop_agreed = False
        # Every rank agrees at the same steps from the first one on, whatever it has to say.
        self._next_check = 0
        self._last_check: tuple[int, float] | None = None
        self.checks = 0
        #: the state entries whose replicas differed at start-up (``check_replicas``)
        self.replicas_differ: list[str] = []

    @property
    def is_chief(self) -> bool:
        """True on the chief."""
        return self.rank == self.chief_rank

    def check_same(self, what: Mapping[str, Any]) -> None:
        """Raise on every rank unless every rank passed the same values.

        Args:
          what: ``{argument name: JSON value}`` as this rank passed them.

        Raises:
          ValueError: naming the first argument that differs, the ranks, their values.
        """
        values = self.checkpoint_group.all_gather(dict(what))
        group = self.checkpoint_group
        for name in what:
            chief_value = values[0][name]
            differ = [
                (rank, v[name])
                for rank, v in _in_job_order(values, group.world_size, self.chief_rank)
                if v[name] != chief_value
            ]
            if differ:
                shown = "; ".join(f"rank {rank}: {value!r}" for rank, value in differ[:4])
                raise ValueError(
                    f"Every rank of the job must pass the same {name}: the chief (rank "
                    f"{self.chief_rank}) passes {chief_value!r}; {shown}."
                )

    def wait_ready(self, max_wait_secs: float, *, what: str = "ready") -> None:
        """Return once every rank got here; within ``max_wait_secs``, else TF's error.

        Raises:
          DeadlineExceededError: ``"Session was not ready after waiting N secs."``
        """
        try:
            self._dist.monitored_barrier(
                group=self._control, timeout=timedelta(seconds=max_wait_secs)
            )
        except RuntimeError as e:
            raise errors.DeadlineExceededError(
                f"Session was not ready after waiting {int(max_wait_secs)} secs. (rank "
                f"{self.rank} of {self.world_size}, waiting until every rank was {what}: {e})"
            ) from e
        # On the control group: the checkpoint group may be busy with a background save.
        import torch

        mine = torch.tensor([len(self._votes)], dtype=torch.int64)
        gathered = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._dist.all_gather(gathered, mine, group=self._control)
        counts = [int(c.item()) for c in gathered]
        if len(set(counts)) != 1:
            raise ValueError(
                "Every rank of the job must run the same CheckpointSaverHooks: ranks have "
                f"{counts} hooks saving every N seconds (in rank order). Pass "
                "them in hooks= on every rank, not in chief_only_hooks=."
            )
        # From now on a late peer is a lost one: the checkpoint timeout applies.
        set_timeout = getattr(self._dist.distributed_c10d, "_set_pg_timeout", None)
        if set_timeout is not None:
            set_timeout(timedelta(seconds=self._timeout_secs), self._control)

    def check_replicas(self, state: Mapping[str, Any] | None) -> list[str]:
        """Compare a digest of each replicated entry across ranks; warn about differences.

        After the restore (or ``init_fn``) every rank should hold the same replica of the
        state entries that are not per rank: a rank that restored something else, or an
        ``init_fn`` seeded per rank, makes the replicas drift apart silently (DDP only
        broadcasts the module's parameters). Entries holding DTensors (their shards
        differ by design), ``PerRank`` and ``RNGState`` entries, and accelerator state
        (it would need a copy to the host) are left out. Every rank calls it at once.

        Returns:
          The names of the entries that differ (logged as a WARNING on the chief).
        """
        mine = replica_digests(state)
        group = TorchProcessGroup(
            self._timeout_secs, coordinator=self.chief_rank, group=self._control
        )
        everyone = _in_job_order(group.all_gather(mine), self.world_size, self.chief_rank)
        differ = [
            name
            for name, digest in mine.items()
            if any(theirs.get(name) != digest for _, theirs in everyone)
        ]
        self.replicas_differ = differ
        if differ and self.is_chief:
            logger.warning(
                "State entries %s differ between the ranks of the job after the restore or "
                "init_fn: every rank must hold the same replica. Values that differ per rank "
                "by design belong in th.PerRank(...).",
                differ,
            )
        return differ

    # -- agreements at step boundaries --------------------------------------------

    def watch(self, preemption: PreemptionWatcher) -> None:
        """Turn ``preemption``'s signals into votes that every rank stops on together."""
        preemption.defer_to_job()
        self._preemption = preemption

    def request_stop(self) -> None:
        """Vote to stop: every rank stops at the next check step (a listener's request)."""
        self._stop_vote = True

    def add_save_vote(self, vote: Callable[[int], bool]) -> int:
        """Register the chief's ``vote(step)``: save after the step following ``step``?

        Every rank registers in the same order (the same hooks); only the chief's vote is
        asked. Returns the slot to pass to :meth:`take_save`.
        """
        self._votes.append(vote)
        self._agreed_saves.append(False)
        return len(self._votes) - 1

    def take_save(self, slot: int) -> bool:
        """True once after the ranks agreed to save for ``slot``'s vote."""
        agreed = self._agreed_saves[slot]
        self._agreed_saves[slot] = False
        return agreed

    def due(self, step: int) -> bool:
        """Whether the ranks agree on something before the step after ``step``."""
        return step >= self._next_check

    def agree(self, step: int) -> None:
        """The agreement at a check step; every rank calls it at the same ``step``.

        Raises:
          PeerLostError: a rank was lost or did not arrive within the timeout.
        """
        import torch

        pending = self._preemption.pending_signal if self._preemption is not None else None
        chief = self.is_chief
        votes = [int(bool(vote(step))) for vote in self._votes] if chief else [0] * len(self._votes)
        interval = self._steps_to_next_check(step) if chief else 0
        stop = int(self._stop_vote)
        message = torch.tensor([pending or 0, interval, stop, *votes], dtype=torch.int64)
        start = time.monotonic()
        try:
            self._dist.all_reduce(message, op=self._dist.ReduceOp.MAX, group=self._control)
        except RuntimeError as e:
            raise errors.PeerLostError(
                f"Rank {self.rank} of {self.world_size}: a peer of the torch.distributed job "
                f"was lost or did not reach step {step} within {time.monotonic() - start:.1f} s "
                f"(timeout {self._timeout_secs:g} s): {e}"
            ) from e
        signum, interval, stop, *agreed = (int(v) for v in message.tolist())
        self.checks += 1
        if stop:
            self.stop_agreed = True
        self._next_check = step + max(1, interval)
        for slot, save in enumerate(agreed):
            if save:
                self._agreed_saves[slot] = True
        if signum and self._preemption is not None:
            self._preemption.agree(signum)

    def _steps_to_next_check(self, step: int) -> int:
        """The chief's choice: about ``CHECK_INTERVAL_SECS`` of steps at the current rate."""
        now = time.monotonic()
        last, self._last_check = self._last_check, (step, now)
        if last is None or step <= last[0]:
            return 1
        secs_per_step = max((now - last[1]) / (step - last[0]), 1e-9)
        return max(1, min(MAX_STEPS_BETWEEN_CHECKS, int(CHECK_INTERVAL_SECS / secs_per_step)))

    def __repr__(self) -> str:
        return f"Job(rank={self.rank}, world_size={self.world_size}, chief_rank={self.chief_rank})"


def _in_job_order(values: list[Any], world_size: int, chief_rank: int) -> list[tuple[int, Any]]:
    """``(job rank, value)`` for values listed from the chief on (the group's order)."""
    return [((chief_rank + i) % world_size, v) for i, v in enumerate(values)]


def form_job(
    *,
    is_chief: bool | None,
    max_wait_secs: float,
    timeout_secs: float = DEFAULT_TIMEOUT_SECS,
    same: Mapping[str, Any] | None = None,
) -> Job | None:
    """Form the job on every rank at once; None outside a job of several processes.

    Args:
      is_chief: this rank's ``is_chief``; None: no opinion (rank 0 is the chief unless
        another rank passes True).
      max_wait_secs: how long to wait for every rank to arrive.
      timeout_secs: the timeout of every later checkpoint and agreement collective.
      same: ``{name: JSON value}`` that every rank must pass identically.

    Raises:
      ValueError: not exactly one chief, or ranks passed different ``same`` values.
      DeadlineExceededError: a rank did not arrive within ``max_wait_secs``.
    """
    if not in_job():
        return None
    dist = _dist()
    assert dist is not None
    import torch

    rank, world_size = dist.get_rank(), dist.get_world_size()
    try:
        # Its creation waits for every rank too, within its timeout: max_wait_secs until
        # the session is ready (Job.wait_ready), the checkpoint timeout after that.
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=max_wait_secs))
        dist.monitored_barrier(group=control, timeout=timedelta(seconds=max_wait_secs))
    except RuntimeError as e:
        raise errors.DeadlineExceededError(
            f"Session was not ready after waiting {int(max_wait_secs)} secs. (rank {rank} "
            f"of {world_size}, waiting for every rank to create its session: {e})"
        ) from e
    # 1: is_chief=True, 0: left unset, -1: is_chief=False.
    mine = torch.tensor([0 if is_chief is None else (1 if is_chief else -1)], dtype=torch.int64)
    flags = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
    dist.all_gather(flags, mine, group=control)
    said = [int(f.item()) for f in flags]
    chiefs = [r for r, f in enumerate(said) if f == 1]
    if not chiefs and said[0] == 0:
        chiefs = [0]  # nobody said: rank 0
    if len(chiefs) != 1:
        raise ValueError(
            f"A torch.distributed job needs exactly one chief, found {len(chiefs)}"
            + (
                f" (ranks {chiefs} pass is_chief=True)"
                if chiefs
                else " (rank 0 passes is_chief=False)"
            )
            + ": leave is_chief unset everywhere (rank 0 is the chief) or pass "
            "is_chief=True on one rank only."
        )
    job = Job(dist, control, chief_rank=chiefs[0], timeout_secs=timeout_secs)
    if same:
        job.check_same(same)
    logger.info("Rank %d of %d joined the job (chief: rank %d).", rank, world_size, job.chief_rank)
    return job
