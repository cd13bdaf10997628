"""trainhooks: TensorFlow 1.x's monitored training sessions, hooks and Saver for
PyTorch, NumPy and JAX loops, with crash-safe, verified, optionally background checkpoints.

    import trainhooks as th

    state = {"model": model, "optimizer": optimizer}
    with th.MonitoredTrainingSession(
        state=state, checkpoint_dir="ckpt", save_checkpoint_steps=100,
        hooks=[th.StopAtStepHook(last_step=1000)],
    ) as sess:
        while not sess.should_stop():
            sess.run(train_step)

The public API is exactly the names below; submodules are implementation. Names are
imported lazily, so ``import trainhooks`` stays cheap and never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainhooks import errors

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # hook protocol
    "SessionRunHook": "trainhooks.session.run_hook",
    "SessionRunArgs": "trainhooks.session.run_hook",
    "SessionRunContext": "trainhooks.session.run_hook",
    "SessionRunValues": "trainhooks.session.run_hook",
    # sessions
    "Session": "trainhooks.session.session",
    "MonitoredTrainingSession": "trainhooks.session.training",
    "MonitoredSession": "trainhooks.session.monitored",
    "SingularMonitoredSession": "trainhooks.session.monitored",
    "StepContext": "trainhooks.session.monitored",
    "ChiefSessionCreator": "trainhooks.session.creators",
    "WorkerSessionCreator": "trainhooks.session.creators",
    "Scaffold": "trainhooks.session.creators",
    "Coordinator": "trainhooks.session.coordinator",
    # hooks
    "SecondOrStepTimer": "trainhooks.hooks.timers",
    "NeverTriggerTimer": "trainhooks.hooks.timers",
    "CheckpointSaverHook": "trainhooks.hooks.checkpoint",
    "CheckpointSaverListener": "trainhooks.hooks.checkpoint",
    "StopAtStepHook": "trainhooks.hooks.basic",
    "StepCounterHook": "trainhooks.hooks.basic",
    "LoggingTensorHook": "trainhooks.hooks.tensors",
    "NanTensorHook": "trainhooks.hooks.tensors",
    "NanLossDuringTrainingError": "trainhooks.hooks.tensors",
    "GlobalStepWaiterHook": "trainhooks.hooks.basic",
    "FinalOpsHook": "trainhooks.hooks.basic",
    "FeedFnHook": "trainhooks.hooks.basic",
    "SummarySaverHook": "trainhooks.hooks.summary",
    "ProfilerHook": "trainhooks.hooks.profiler",
    "BackupListener": "trainhooks.hooks.listeners.backup",
    "EvaluationListener": "trainhooks.hooks.listeners.evaluation",
    "KeepBestListener": "trainhooks.hooks.listeners.keep_best",
    # checkpoints
    "Saver": "trainhooks.checkpoint.saver",
    "latest_checkpoint": "trainhooks.checkpoint.state_file",
    "get_checkpoint_state": "trainhooks.checkpoint.state_file",
    "update_checkpoint_state": "trainhooks.checkpoint.state_file",
    "checkpoint_exists": "trainhooks.checkpoint.checkpoint_files",
    "get_checkpoint_mtimes": "trainhooks.checkpoint.checkpoint_files",
    "remove_checkpoint": "trainhooks.checkpoint.checkpoint_files",
    "CheckpointState": "trainhooks.checkpoint.state_file",
    "load_checkpoint": "trainhooks.checkpoint.reader",
    "list_variables": "trainhooks.checkpoint.reader",
    "load_variable": "trainhooks.checkpoint.reader",
    "capture_rng_state": "trainhooks.checkpoint.rng",
    "restore_rng_state": "trainhooks.checkpoint.rng",
    "RNGState": "trainhooks.checkpoint.rng",
}

__all__ = ["__version__", "errors", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trainhooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from trainhooks.checkpoint.reader import list_variables, load_checkpoint, load_variable
    from trainhooks.checkpoint.rng import RNGState, capture_rng_state, restore_rng_state
    from trainhooks.checkpoint.saver import Saver
    from trainhooks.checkpoint.state_file import (
        CheckpointState,
        checkpoint_exists,
        get_checkpoint_mtimes,
        get_checkpoint_state,
        latest_checkpoint,
        remove_checkpoint,
        update_checkpoint_state,
    )
    from trainhooks.hooks.basic import (
        FeedFnHook,
        FinalOpsHook,
        GlobalStepWaiterHook,
        StepCounterHook,
        StopAtStepHook,
    )
    from trainhooks.hooks.checkpoint import CheckpointSaverHook, CheckpointSaverListener
    from trainhooks.hooks.listeners.backup import BackupListener
    from trainhooks.hooks.listeners.evaluation import EvaluationListener
    from trainhooks.hooks.listeners.keep_best import KeepBestListener
    from trainhooks.hooks.profiler import ProfilerHook
    from trainhooks.hooks.summary import SummarySaverHook
    from trainhooks.hooks.tensors import (
        LoggingTensorHook,
        NanLossDuringTrainingError,
        NanTensorHook,
    )
    from trainhooks.hooks.timers import NeverTriggerTimer, SecondOrStepTimer
    from trainhooks.session.coordinator import Coordinator
    from trainhooks.session.creators import ChiefSessionCreator, Scaffold, WorkerSessionCreator
    from trainhooks.session.monitored import (
        MonitoredSession,
        SingularMonitoredSession,
        StepContext,
    )
    from trainhooks.session.run_hook import (
        SessionRunArgs,
        SessionRunContext,
        SessionRunHook,
        SessionRunValues,
    )
    from trainhooks.session.session import Session
    from trainhooks.session.training import MonitoredTrainingSession
