"""``MonitoredTrainingSession``: a ``MonitoredSession`` with TF's default training hooks.

The one module that knows sessions, hooks and checkpoints: everything it assembles
sits in a layer below it.

It resolves TF's defaults (checkpoints every 600 s, summaries every 100 steps, the
step counter every 100 steps), forms the torch.distributed job when there is one
(``session/job.py``: the chief is rank 0 unless ``is_chief`` says otherwise), picks the
session creator for the chief or a worker,
and orders the hooks as TF does: ``chief_only_hooks``, ``StepCounterHook``,
``SummarySaverHook``, ``CheckpointSaverHook``, then the user's ``hooks``. The default
step counter and summary hooks are imported only when they are used (their event
writer is a heavy import).

Two guards beyond TF: the chief that saves checkpoints holds the checkpoint
directory's writer lock (``checkpoint/storage/lock.py``) while the session is open, so a
second process saving into the same directory fails at once with a clear error; and
SIGTERM (or the signals named) stops training at the next step boundary with a final
checkpoint (``session/preemption.py``).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping, Sequence
from typing import Any

from trainhooks.checkpoint.distributed.torch_group import DEFAULT_TIMEOUT_SECS
from trainhooks.checkpoint.storage import storage_for
from trainhooks.hooks.checkpoint import CheckpointSaverHook
from trainhooks.session import monitored
from trainhooks.session.creators import (
    ChiefSessionCreator,
    Scaffold,
    WorkerSessionCreator,
    resolve_scaffold,
)
from trainhooks.session.job import form_job, init_from_master
from trainhooks.session.preemption import DEFAULT_GRACE_PERIOD_SECS, PreemptionWatcher
from trainhooks.session.run_hook import SessionRunHook

__all__ = ["USE_DEFAULT", "MonitoredTrainingSession"]

logger = logging.getLogger(__name__)


class _UseDefault:
    def __repr__(self) -> str:
        return "USE_DEFAULT"


#: Marks an argument of ``MonitoredTrainingSession`` left at TF's default.
USE_DEFAULT: Any = _UseDefault()


def MonitoredTrainingSession(
    master: str = "",
    is_chief: bool | None = None,
    checkpoint_dir: str | None = None,
    scaffold: Scaffold | None = None,
    hooks: Sequence[SessionRunHook] | None = None,
    chief_only_hooks: Sequence[SessionRunHook] | None = None,
    save_checkpoint_secs: Any = USE_DEFAULT,
    save_summaries_steps: Any = USE_DEFAULT,
    save_summaries_secs: Any = USE_DEFAULT,
    config: Any = None,
    stop_grace_period_secs: float = 120,
    log_step_count_steps: int | None = 100,
    max_wait_secs: float = 7200,
    save_checkpoint_steps: Any = USE_DEFAULT,
    summary_dir: str | None = None,
    *,
    state: Mapping[str, Any] | None = None,
    async_checkpoint: bool = False,
    advance_global_step: bool = True,
    preemption_signals: Sequence[int] | None = (signal.SIGTERM,),
    preemption_grace_period_secs: float | None = DEFAULT_GRACE_PERIOD_SECS,
    on_checkpoint_error: str = "raise",
    exit_on_preemption: bool = False,
    strict_restore: bool | None = None,
    checkpoint_timeout_secs: float = DEFAULT_TIMEOUT_SECS,
) -> monitored.MonitoredSession:
    """A ``MonitoredSession`` with TF's default hooks for training.

    The chief restores the latest checkpoint in ``checkpoint_dir`` (or initializes)
    and runs, in this order: ``chief_only_hooks``, ``StepCounterHook``,
    ``SummarySaverHook``, ``CheckpointSaverHook``, then ``hooks``. The step counter
    and summaries go to ``summary_dir`` (default ``checkpoint_dir``). A non-chief
    runs only ``hooks`` and never writes. With neither given, checkpoints are saved
    every 600 s and summaries every 100 steps; 0 or None turns a default hook off.

    In a torch.distributed job (initialized before this call, or by ``master``) every
    rank calls it with the same ``checkpoint_dir`` and state: the session is one
    process of the job (``docs/architecture.md``). The chief chooses the checkpoint to
    restore and every rank restores it; every rank runs the ``CheckpointSaverHook`` and
    writes its part of each checkpoint, which the chief commits once (listeners run on
    the chief); summaries, the step counter and ``chief_only_hooks`` run on the chief;
    the ranks agree on ``save_checkpoint_secs`` saves and on stopping after a signal.

    Args:
      master: a torch.distributed init method (``"env://"``, ``"tcp://host:port"``,
        ``"file:///path"``) to initialize the job with when it is not yet initialized;
        ``""`` (default): a single process, or the job already initialized. Anything
        else is accepted for TF compatibility and unused.
      is_chief: whether this process is the chief (restores, saves and summarizes).
        Default: rank 0 in a torch.distributed job, else True. A job must have
        exactly one chief.
      checkpoint_dir: where checkpoints are restored from and saved to.
      scaffold: the :class:`Scaffold`; default one holding ``state``.
      hooks: hooks every process runs, after the default ones.
      chief_only_hooks: hooks only the chief runs, before the default ones.
      save_checkpoint_secs: save every N seconds (default 600 when neither is given).
      save_summaries_steps: write summaries every N steps (default 100).
      save_summaries_secs: write summaries every N seconds.
      config: accepted for TF compatibility; unused.
      stop_grace_period_secs: how long ``close`` waits for coordinator threads.
      log_step_count_steps: log and record steps/sec every N steps (0 or None: off).
      max_wait_secs: in a torch.distributed job, how long a rank waits for the others
        at start-up (``DeadlineExceededError`` after it); unused in a single process.
      save_checkpoint_steps: save every N steps instead of every N seconds.
      summary_dir: where summaries go; default ``checkpoint_dir``.
      state: the training state (see ``Session``).
      async_checkpoint: write checkpoints in the background (``CheckpointSaverHook(async_save=True)``).
      advance_global_step: False when the step function advances the global step itself.
      preemption_signals: signals that stop training at the next step boundary, run
        the hooks' ``end`` (the chief saves a final checkpoint of the last completed
        step) and close the session; the handlers are installed only from the main
        thread and the previous ones restored on close. None or ``()``: off.
      preemption_grace_period_secs: after such a signal, how long the session may
        take to stop and close before the process exits with status 128 + signum
        (None: no limit). Keep it below the scheduler's kill timeout.
      on_checkpoint_error: ``"raise"`` (TF's behaviour: a failed save stops training)
        or ``"log"``: log the error and keep training; the previous checkpoints stay
        listed and intact. Passed to ``CheckpointSaverHook(on_save_error=...)``.
      exit_on_preemption: after a termination signal stopped training and the session
        closed cleanly (final checkpoint saved), exit the process with status
        ``128 + signum`` so that a scheduler requeues the job. Without it the ``with``
        block ends normally; ``sess.preempted`` tells a preempted run from a finished one.
      strict_restore: False restores the entries of the state that the checkpoint has
        and keeps the others as initialized, reporting each: add an entry to the state
        of a running experiment this way. Default: the scaffold's (True: a checkpoint
        must match the state entry for entry).
      checkpoint_timeout_secs: in a torch.distributed job, how long a checkpoint or
        agreement collective waits for the slowest rank before every rank raises
        ``PeerLostError``; also the timeout of a job initialized from ``master``.

    Returns:
      a :class:`MonitoredSession`.

    Raises:
      ValueError: if both ``save_checkpoint_secs`` and ``save_checkpoint_steps`` (or
        both summary settings) are given, as ``CheckpointSaverHook`` refuses them, or
        ``on_checkpoint_error`` is neither ``"raise"`` nor ``"log"``.
      CheckpointDirLockedError: another process is saving into ``checkpoint_dir``.
      DeadlineExceededError: in a job, a rank did not arrive within ``max_wait_secs``.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> import trainhooks as th
        >>> state = {"w": np.zeros(3), "epoch": 0}
        >>> def train_step():
        ...     state["w"] += 0.5
        ...     return {"loss": float(state["w"].sum())}
        >>> checkpoint_dir = tempfile.mkdtemp()
        >>> with MonitoredTrainingSession(
        ...     checkpoint_dir=checkpoint_dir, state=state,
        ...     save_checkpoint_steps=5, hooks=[th.StopAtStepHook(last_step=10)],
        ... ) as sess:
        ...     while not sess.should_stop():
        ...         results = sess.run(train_step)
        >>> results["loss"]
        15.0
        >>> th.latest_checkpoint(checkpoint_dir) == os.path.join(checkpoint_dir, "model.ckpt-10")
        True
    """
    from trainhooks import _checks

    _checks.boolean("is_chief", is_chief, allow_none=True)
    _checks.string("master", master, example="'env://'")
    _checks.positive_number(
        "checkpoint_timeout_secs", checkpoint_timeout_secs, unit="seconds", example=600
    )
    checkpoint_dir = _checks.directory_path("checkpoint_dir", checkpoint_dir)
    _checks.instance_of("scaffold", scaffold, Scaffold, example="Scaffold(state=state)")
    hooks = _checks.hook_list("hooks", hooks)
    chief_only_hooks = _checks.hook_list("chief_only_hooks", chief_only_hooks)
    if save_checkpoint_secs is not USE_DEFAULT:
        _checks.positive_number(
            "save_checkpoint_secs", save_checkpoint_secs, allow_zero=True, unit="seconds"
        )
    if save_summaries_steps is not USE_DEFAULT:
        _checks.positive_int("save_summaries_steps", save_summaries_steps, allow_zero=True)
    if save_summaries_secs is not USE_DEFAULT:
        _checks.positive_number(
            "save_summaries_secs", save_summaries_secs, allow_zero=True, unit="seconds"
        )
    _checks.non_negative_number(
        "stop_grace_period_secs", stop_grace_period_secs, allow_none=False, example=120
    )
    _checks.positive_int("log_step_count_steps", log_step_count_steps, allow_zero=True)
    _checks.non_negative_number("max_wait_secs", max_wait_secs, allow_none=False, example=7200)
    if save_checkpoint_steps is not USE_DEFAULT:
        _checks.positive_int("save_checkpoint_steps", save_checkpoint_steps, allow_zero=True)
    summary_dir = _checks.directory_path("summary_dir", summary_dir)
    _checks.mapping("state", state, example="{'model': model, 'optimizer': optimizer}")
    _checks.boolean("async_checkpoint", async_checkpoint)
    _checks.boolean("advance_global_step", advance_global_step)
    _checks.non_negative_number(
        "preemption_grace_period_secs", preemption_grace_period_secs, unit="seconds", example=30
    )
    summaries_asked = (
        save_summaries_steps is not USE_DEFAULT or save_summaries_secs is not USE_DEFAULT
    )
    if save_summaries_steps is USE_DEFAULT and save_summaries_secs is USE_DEFAULT:
        save_summaries_steps, save_summaries_secs = 100, None
    elif save_summaries_secs is USE_DEFAULT:
        save_summaries_secs = None
    elif save_summaries_steps is USE_DEFAULT:
        save_summaries_steps = None

    if save_checkpoint_steps is USE_DEFAULT and save_checkpoint_secs is USE_DEFAULT:
        save_checkpoint_steps, save_checkpoint_secs = None, 600
    elif save_checkpoint_secs is USE_DEFAULT:
        save_checkpoint_secs = None
    elif save_checkpoint_steps is USE_DEFAULT:
        save_checkpoint_steps = None

    if on_checkpoint_error not in ("raise", "log"):
        raise ValueError(
            f"on_checkpoint_error must be 'raise' or 'log', got {on_checkpoint_error!r}."
        )
    preemption = (
        PreemptionWatcher(
            preemption_signals,
            preemption_grace_period_secs,
            exit_after_close=exit_on_preemption,
        )
        if preemption_signals
        else None
    )
    scaffold = resolve_scaffold(scaffold, state)
    if strict_restore is not None and strict_restore != scaffold.strict_restore:
        scaffold = Scaffold(copy_from_scaffold=scaffold, strict_restore=strict_restore)
    init_from_master(master, timeout_secs=checkpoint_timeout_secs)
    job = form_job(
        is_chief=is_chief,
        max_wait_secs=max_wait_secs,
        timeout_secs=checkpoint_timeout_secs,
        same={
            "checkpoint_dir": checkpoint_dir,
            "state entries": None if scaffold.state is None else sorted(map(str, scaffold.state)),
        },
    )
    is_chief = job.is_chief if job is not None else (True if is_chief is None else is_chief)
    if not is_chief and job is None:
        worker_creator = WorkerSessionCreator(
            scaffold=scaffold,
            master=master,
            config=config,
            max_wait_secs=max_wait_secs,
            checkpoint_dir=checkpoint_dir,
            advance_global_step=advance_global_step,
        )
        return monitored.MonitoredSession(
            session_creator=worker_creator,
            hooks=list(hooks or []),
            stop_grace_period_secs=stop_grace_period_secs,
            preemption=preemption,
            _job=None,
        )

    participants: list[SessionRunHook] = []
    if job is not None:
        # TF's idiom chief_only_hooks=[CheckpointSaverHook(...)]: in a job every rank
        # writes part of each checkpoint, so every rank runs such a hook.
        participants = [h for h in chief_only_hooks or [] if isinstance(h, CheckpointSaverHook)]
        chief_only_hooks = [h for h in chief_only_hooks or [] if h not in participants]
        if participants and is_chief:
            logger.info(
                "In a torch.distributed job every rank runs the CheckpointSaverHooks given in "
                "chief_only_hooks (every rank writes part of each checkpoint); the chief "
                "alone commits and runs their listeners."
            )
    all_hooks: list[SessionRunHook] = participants + (
        list(chief_only_hooks or []) if is_chief else []
    )
    session_creator: ChiefSessionCreator | WorkerSessionCreator
    if is_chief:
        session_creator = ChiefSessionCreator(
            scaffold=scaffold,
            checkpoint_dir=checkpoint_dir,
            master=master,
            config=config,
            advance_global_step=advance_global_step,
        )
    else:  # a rank of a job: restores the chief's choice, writes its part of each save
        session_creator = WorkerSessionCreator(
            scaffold=scaffold,
            master=master,
            config=config,
            max_wait_secs=max_wait_secs,
            checkpoint_dir=checkpoint_dir,
            advance_global_step=advance_global_step,
        )
    summary_dir = (summary_dir or checkpoint_dir) if is_chief else None
    asked = _positive(save_summaries_steps) or _positive(save_summaries_secs)
    if is_chief and summaries_asked and asked and scaffold.summary_op is None:
        logger.warning(
            "save_summaries_steps/save_summaries_secs is set, but there is nothing to "
            "summarize: the scaffold has no summary_op, so no summary is written. Pass "
            "scaffold=Scaffold(summary_op={'loss': 'loss'}) (names the step function returns)."
        )
    if summary_dir:
        if log_step_count_steps and log_step_count_steps > 0:
            from trainhooks.hooks.basic import StepCounterHook

            all_hooks.append(
                StepCounterHook(output_dir=summary_dir, every_n_steps=log_step_count_steps)
            )
        if _positive(save_summaries_steps) or _positive(save_summaries_secs):
            from trainhooks.hooks.summary import SummarySaverHook

            all_hooks.append(
                SummarySaverHook(
                    scaffold=scaffold,
                    save_steps=save_summaries_steps,
                    save_secs=save_summaries_secs,
                    output_dir=summary_dir,
                )
            )
    saves_checkpoints = bool(
        checkpoint_dir and (_positive(save_checkpoint_secs) or _positive(save_checkpoint_steps))
    )
    if saves_checkpoints and checkpoint_dir:
        extra: dict[str, Any] = {"async_save": True} if async_checkpoint else {}
        if on_checkpoint_error != "raise":
            extra["on_save_error"] = on_checkpoint_error
        all_hooks.append(
            CheckpointSaverHook(
                checkpoint_dir,
                save_steps=save_checkpoint_steps,
                save_secs=save_checkpoint_secs,
                scaffold=scaffold,
                **extra,
            )
        )
    all_hooks.extend(hooks or [])
    _share_the_default_saver(all_hooks, scaffold, checkpoint_dir)
    if not (saves_checkpoints and checkpoint_dir and is_chief):
        session = monitored.MonitoredSession(
            session_creator=session_creator,
            hooks=all_hooks,
            stop_grace_period_secs=stop_grace_period_secs,
            preemption=preemption,
            _job=job,
        )
        if saves_checkpoints:
            session._on_close.append(lambda: _close_saver_quietly(scaffold))
        return session
    # Taken before the session restores or saves anything, held until it closes.
    storage = storage_for(checkpoint_dir)
    storage.makedirs(checkpoint_dir)
    lock = storage.lease(checkpoint_dir)
    try:
        session = monitored.MonitoredSession(
            session_creator=session_creator,
            hooks=all_hooks,
            stop_grace_period_secs=stop_grace_period_secs,
            preemption=preemption,
            _job=job,
        )
    except BaseException:
        lock.release()
        raise
    session._on_close.append(lock.release)
    # On a clean close the checkpoint hook's end() closes the saver; after an error it
    # must still release the saver's buffers and directory lock, without masking the error.
    session._on_close.append(lambda: _close_saver_quietly(scaffold))
    return session


def _share_the_default_saver(
    hooks: Sequence[SessionRunHook], scaffold: Scaffold, checkpoint_dir: str | None
) -> None:
    """Checkpoint hooks without a saver save with the scaffold's, the one the session
    restores with (TF's ``_get_saver_or_default``); a hook saving where the session does
    not restore from is a run that cannot resume, and gets a warning naming both."""
    for hook in hooks:
        if not isinstance(hook, CheckpointSaverHook):
            continue
        saves_into = hook.checkpoint_dir
        if checkpoint_dir is not None and os.path.realpath(saves_into) == os.path.realpath(
            checkpoint_dir
        ):
            # Only here: a saver's retention spans every directory it saves into.
            hook._use_default_saver(scaffold)
        else:
            logger.warning(
                "A CheckpointSaverHook saves into %s, but the session restores from %s: a "
                "restarted run will start over instead of resuming from those checkpoints. "
                "Pass checkpoint_dir=%r to MonitoredTrainingSession to resume.",
                saves_into,
                checkpoint_dir if checkpoint_dir is not None else "nowhere (checkpoint_dir=None)",
                saves_into,
            )


def _close_saver_quietly(scaffold: Scaffold) -> None:
    saver = scaffold.saver
    if saver is None:
        return
    try:
        saver.close()
    except Exception:
        logger.warning(
            "Closing the checkpoint saver after the session closed failed.", exc_info=True
        )


def _positive(value: Any) -> bool:
    return bool(value) and value > 0
