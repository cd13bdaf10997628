"""How a monitored session gets its raw session: ``Scaffold`` and the session creators.

A :class:`Scaffold` holds what a session is built from: the training ``state``, the
``saver``, the ``init_fn`` that runs when no checkpoint was restored, and the
``summary_op`` that ``SummarySaverHook`` writes. A session creator turns it into a
raw :class:`~trainhooks.Session`: :class:`ChiefSessionCreator` restores the latest
checkpoint (or a given one) or initializes; :class:`WorkerSessionCreator`, for the
other processes of a job, does the same read-only and never writes.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from trainhooks.session.session import Session

if TYPE_CHECKING:
    from trainhooks.checkpoint.distributed.group import ProcessGroup
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.session.job import Job

__all__ = ["ChiefSessionCreator", "Scaffold", "SessionCreator", "WorkerSessionCreator"]

logger = logging.getLogger(__name__)

#: ``init_fn(scaffold, session)``: initializes the state when no checkpoint was restored.
InitFn = Callable[["Scaffold", Session], None]


class SessionCreator(Protocol):
    """Anything with ``create_session() -> Session`` can feed a ``MonitoredSession``."""

    def create_session(self) -> Session: ...


class Scaffold:
    """What a session is built from: the state, the saver, ``init_fn`` and the summaries.

    Args:
      init_fn: ``init_fn(scaffold, session)``, called only when no checkpoint was
        restored (a fresh start); use it to initialize the state.
      saver: the :class:`~trainhooks.Saver` that restores and saves the state; by
        default :meth:`finalize` creates ``Saver()``, which saves ``session.state``
        (``Saver(async_save=True)`` after :meth:`use_async_save`).
      summary_op: what ``SummarySaverHook`` writes: a fetch name, a list of names, a
        dict ``{tag: name or callable}``, or a callable returning ``{tag: scalar}``.
      copy_from_scaffold: a scaffold whose fields are used where this call passes None.
      state: the training state, a mapping of names to values (see ``Session``).
      strict_restore: True (default): a checkpoint must match the state entry for
        entry. False: restore what matches and keep the rest as initialized, with a
        report of each entry restored or skipped: the one-argument change for adding
        an entry (an EMA copy, a new metric) to the state of a running experiment.

    Raises:
      TypeError: if ``copy_from_scaffold`` is not a ``Scaffold``.

    Example:
        >>> import numpy as np
        >>> def init_fn(scaffold, session):
        ...     session.state["w"][:] = 0.5
        >>> scaffold = Scaffold(init_fn=init_fn, state={"w": np.ones(3)})
        >>> scaffold.finalize() is scaffold
        True
    """

    _user_init_fn: InitFn | None
    _saver: Saver | None
    _summary_op: Any
    _state: Mapping[str, Any] | None
    _async_save: bool

    def __init__(
        self,
        init_fn: InitFn | None = None,
        saver: Saver | None = None,
        summary_op: Any = None,
        copy_from_scaffold: Scaffold | None = None,
        *,
        state: Mapping[str, Any] | None = None,
        strict_restore: bool | None = None,
    ) -> None:
        from trainhooks import _checks

        _checks.function(
            "init_fn", init_fn, allow_none=True, example="lambda scaffold, session: None"
        )
        _checks.has_methods(
            "saver", saver, ("save", "restore"), what="a Saver", example="Saver(max_to_keep=5)"
        )
        _checks.mapping("state", state, example="{'model': model}")
        if copy_from_scaffold is not None:
            if not isinstance(copy_from_scaffold, Scaffold):
                raise TypeError("copy_from_scaffold is not a Scaffold instance.")
            # Like TF, copy the user's init_fn, not the finalized wrapper.
            init_fn = init_fn if init_fn is not None else copy_from_scaffold._user_init_fn
            saver = saver if saver is not None else copy_from_scaffold._saver
            summary_op = summary_op if summary_op is not None else copy_from_scaffold._summary_op
            state = state if state is not None else copy_from_scaffold._state
            async_save = copy_from_scaffold._async_save
            if strict_restore is None:
                strict_restore = copy_from_scaffold.strict_restore
        else:
            async_save = False
        if init_fn is not None and not callable(init_fn):
            raise TypeError(
                f"init_fn must be a callable init_fn(scaffold, session), got {init_fn!r}."
            )
        self._user_init_fn = init_fn
        self._saver = saver
        self._summary_op = summary_op
        self._state = state
        self._async_save = async_save
        self._strict_restore = True if strict_restore is None else bool(strict_restore)
        self._finalized = False
        self._process_group: ProcessGroup | None = None

    @property
    def strict_restore(self) -> bool:
        """Whether a restore must match the state entry for entry (see ``strict_restore=``)."""
        return self._strict_restore

    @property
    def state(self) -> Mapping[str, Any] | None:
        """The training state, or None if the scaffold was built without one."""
        return self._state

    @property
    def init_fn(self) -> Callable[[Session], None] | None:
        """``init_fn`` bound to this scaffold: call it as ``init_fn(session)``; None if not set."""
        user_init_fn = self._user_init_fn
        if user_init_fn is None:
            return None
        return lambda session: user_init_fn(self, session)

    @property
    def saver(self) -> Saver | None:
        """The saver: the one passed in, or after :meth:`finalize` the default ``Saver()``."""
        return self._saver

    @property
    def summary_op(self) -> Any:
        """What ``SummarySaverHook`` writes (names, ``{tag: name/callable}`` or a callable)."""
        return self._summary_op

    @property
    def finalized(self) -> bool:
        """True once :meth:`finalize` has run."""
        return self._finalized

    def use_async_save(self) -> None:
        """Make the scaffold's saver save in the background (``docs/internals.md``).

        Before :meth:`finalize`, with no saver given, the default saver will be
        ``Saver(async_save=True)``; a saver that already saves in the background is
        kept. ``CheckpointSaverHook(scaffold=..., async_save=True)`` (and so
        ``MonitoredTrainingSession(async_checkpoint=True)``) calls it.

        Raises:
          ValueError: the scaffold already holds a saver that saves synchronously.

        Example:
            >>> scaffold = Scaffold(state={"w": 1.0})
            >>> scaffold.use_async_save()
            >>> scaffold.finalize().saver.async_save
            True
        """
        if self._saver is not None and not self._saver.async_save:
            made = "was created by finalize()" if self._finalized else "was passed in"
            raise ValueError(
                f"Background saving was asked of a Scaffold whose saver saves synchronously "
                f"(it {made}): pass Scaffold(saver=Saver(async_save=True)), or ask for "
                "background saving before the scaffold is finalized."
            )
        self._async_save = True

    def join_job(self, group: ProcessGroup) -> None:
        """Save and restore with a torch.distributed job's checkpoint ``group``.

        A monitored session in a job calls it: the saver given, or the default one
        :meth:`finalize` creates, then saves with every rank writing and restores the
        checkpoint the chief chose (``Saver(process_group=...)``).

        Raises:
          ValueError: the scaffold's saver already saved alone or with another group.
        """
        self._process_group = group
        if self._saver is not None:
            self._saver.join_job(group)

    def finalize(self) -> Scaffold:
        """Create the default saver if none was given; calling it again does nothing.

        Returns:
          this scaffold.
        """
        if self._finalized:
            return self
        if self._saver is None:
            from trainhooks.checkpoint.saver import Saver

            self._saver = Saver(async_save=self._async_save, process_group=self._process_group)
        self._finalized = True
        return self

    def __repr__(self) -> str:
        names = sorted(self._state) if self._state is not None else None
        return f"Scaffold(state={names}, saver={self._saver!r}, finalized={self._finalized})"


def resolve_scaffold(scaffold: Scaffold | None, state: Mapping[str, Any] | None) -> Scaffold:
    """The scaffold a session is built from, with ``state=`` merged in.

    ``state=`` is a shortcut for ``Scaffold(state=...)``; given with a scaffold that has
    no state, the result is a copy of that scaffold holding ``state``.

    Raises:
      ValueError: if both the scaffold and ``state=`` hold a state.
    """
    if scaffold is not None and not isinstance(scaffold, Scaffold):
        raise TypeError(f"scaffold must be a trainhooks.Scaffold, got {type(scaffold).__name__}.")
    if state is None:
        return scaffold if scaffold is not None else Scaffold()
    if scaffold is None:
        return Scaffold(state=state)
    if scaffold.state is not None:
        raise ValueError(
            "The state was given twice: as state= and as scaffold.state. Pass it only once, "
            "either Scaffold(state=...) or state=..."
        )
    return Scaffold(copy_from_scaffold=scaffold, state=state)


def _check_state(state: Mapping[str, Any] | None) -> None:
    """Refuse unsupported state entries now, with an error naming the entry."""
    if state is None:
        return
    try:
        tree = importlib.import_module("trainhooks.checkpoint.state.tree")
    except ImportError:
        return
    check_state = getattr(tree, "check_state", None)
    if check_state is not None:
        check_state(state)


class _BaseSessionCreator:
    def __init__(
        self,
        scaffold: Scaffold | None,
        state: Mapping[str, Any] | None,
        checkpoint_dir: str | None,
        advance_global_step: bool,
    ) -> None:
        self._scaffold = resolve_scaffold(scaffold, state)
        _check_state(self._scaffold.state)
        self._checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
        self._advance_global_step = advance_global_step

    @property
    def scaffold(self) -> Scaffold:
        """The :class:`Scaffold` this creator builds sessions from."""
        return self._scaffold

    @property
    def checkpoint_dir(self) -> str | None:
        """The directory the latest checkpoint is restored from, or None."""
        return self._checkpoint_dir

    def _join_job(self, job: Job) -> None:
        """Restore as one process of ``job``: the chief chooses, every rank restores."""
        self._scaffold.join_job(job.checkpoint_group)

    def _new_session(self) -> Session:
        self._scaffold.finalize()
        return Session(
            self._scaffold.state,
            global_step=0,
            advance_global_step=self._advance_global_step,
        )

    def _restore_latest(self, sess: Session, *, repair_state_file: bool = False) -> bool:
        saver = self._scaffold.saver
        if saver is None or not self._checkpoint_dir:
            return False
        restored = saver.restore_latest(
            sess,
            self._checkpoint_dir,
            repair_state_file=repair_state_file,
            strict=self._scaffold.strict_restore,
        )
        return restored is not None

    def _initialize(self, sess: Session) -> None:
        init_fn = self._scaffold.init_fn
        if init_fn is not None:
            init_fn(sess)


class ChiefSessionCreator(_BaseSessionCreator):
    """Creates the chief's session: restores a checkpoint, or initializes the state.

    ``create_session()`` finalizes the scaffold, makes a raw ``Session`` at global step
    0, then restores ``checkpoint_filename_with_path`` if given, else the newest
    checkpoint in ``checkpoint_dir`` that verifies; when nothing was restored it runs
    the scaffold's ``init_fn``.

    Args:
      scaffold: the :class:`Scaffold`; default ``Scaffold()`` (with ``state``).
      master: accepted for TF compatibility; unused.
      config: accepted for TF compatibility; unused.
      checkpoint_dir: the directory to restore the latest checkpoint from.
      checkpoint_filename_with_path: a checkpoint prefix to restore instead.
      state: shortcut for ``Scaffold(state=...)``.
      advance_global_step: passed to ``Session``: False when the step function
        advances ``session.global_step`` itself.

    Raises:
      ValueError: if both ``checkpoint_dir`` and ``checkpoint_filename_with_path`` are
        given, or if the state is given both here and in the scaffold.

    Example:
        >>> creator = ChiefSessionCreator(state={"w": 1.0}, checkpoint_dir="/tmp/ckpt")
        >>> sess = creator.create_session()
    """

    def __init__(
        self,
        scaffold: Scaffold | None = None,
        master: str = "",
        config: Any = None,
        checkpoint_dir: str | None = None,
        checkpoint_filename_with_path: str | None = None,
        *,
        state: Mapping[str, Any] | None = None,
        advance_global_step: bool = True,
    ) -> None:
        from trainhooks import _checks

        _checks.instance_of("scaffold", scaffold, Scaffold, example="Scaffold(state=state)")
        checkpoint_dir = _checks.directory_path("checkpoint_dir", checkpoint_dir)
        checkpoint_filename_with_path = _checks.path(
            "checkpoint_filename_with_path", checkpoint_filename_with_path
        )
        _checks.mapping("state", state, example="{'model': model}")
        _checks.boolean("advance_global_step", advance_global_step)
        if checkpoint_dir and checkpoint_filename_with_path:
            raise ValueError(
                "Can not provide both checkpoint_dir and checkpoint_filename_with_path."
            )
        super().__init__(scaffold, state, checkpoint_dir, advance_global_step)
        self._master = master
        self._config = config
        self._checkpoint_filename_with_path = (
            None if checkpoint_filename_with_path is None else str(checkpoint_filename_with_path)
        )

    def create_session(self) -> Session:
        """Make the raw session and restore or initialize its state.

        Returns:
          the new :class:`~trainhooks.Session`.
        """
        sess = self._new_session()
        saver = self._scaffold.saver
        if self._checkpoint_filename_with_path and saver is not None:
            saver.restore(
                sess, self._checkpoint_filename_with_path, strict=self._scaffold.strict_restore
            )
            restored = True
        else:
            # The chief writes into the directory: it repairs a lost state file.
            restored = self._restore_latest(sess, repair_state_file=True)
        if not restored:
            self._initialize(sess)
        return sess


class WorkerSessionCreator(_BaseSessionCreator):
    """Creates a non-chief worker's session: restores read-only, or initializes; never writes.

    Every process of a job holds its own replica of the state. A worker restores the
    same latest checkpoint as the chief from ``checkpoint_dir`` (nothing is written)
    or, when there is none, runs the scaffold's ``init_fn``. In a torch.distributed job
    the chief alone chooses that checkpoint and the worker restores the chief's choice;
    a creator used there by a monitored session joins the job (``session/job.py``).

    Args:
      scaffold: the :class:`Scaffold`; default ``Scaffold()`` (with ``state``).
      master: accepted for TF compatibility; unused.
      config: accepted for TF compatibility; unused.
      max_wait_secs: in a torch.distributed job, how long this rank waits for every
        rank at start-up and at the readiness barrier after the restore
        (``DeadlineExceededError`` after it); unused in a single process.
      state: shortcut for ``Scaffold(state=...)``.
      checkpoint_dir: the directory to restore the latest checkpoint from, if any.
      advance_global_step: passed to ``Session``.

    Example:
        >>> creator = WorkerSessionCreator(state={"w": 1.0}, checkpoint_dir="/tmp/ckpt")
        >>> sess = creator.create_session()
    """

    def __init__(
        self,
        scaffold: Scaffold | None = None,
        master: str = "",
        config: Any = None,
        max_wait_secs: float = 30 * 60,
        *,
        state: Mapping[str, Any] | None = None,
        checkpoint_dir: str | None = None,
        advance_global_step: bool = True,
    ) -> None:
        from trainhooks import _checks

        _checks.instance_of("scaffold", scaffold, Scaffold, example="Scaffold(state=state)")
        _checks.non_negative_number("max_wait_secs", max_wait_secs, unit="seconds", example=1800)
        _checks.mapping("state", state, example="{'model': model}")
        checkpoint_dir = _checks.directory_path("checkpoint_dir", checkpoint_dir)
        _checks.boolean("advance_global_step", advance_global_step)
        super().__init__(scaffold, state, checkpoint_dir, advance_global_step)
        self._master = master
        self._config = config
        self._max_wait_secs = max_wait_secs

    @property
    def max_wait_secs(self) -> float:
        """How long this worker waits for the other processes of its job to be ready."""
        return self._max_wait_secs

    def create_session(self) -> Session:
        """Make the raw session and restore (read-only) or initialize its state.

        Returns:
          the new :class:`~trainhooks.Session`.
        """
        sess = self._new_session()
        if not self._restore_latest(sess):
            self._initialize(sess)
        return sess
