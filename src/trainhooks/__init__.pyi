"""The public API of trainhooks: this stub is the one list of exported names.

``__init__.py`` loads each name lazily from it (``lazy_loader.attach_stub``), and type
checkers read it as the package's interface. A name added here is exported; a test
checks that each has a docstring and an entry in ``docs/reference``.
"""

# The imports are grouped by topic (the comments), not sorted.
# ruff: noqa: I001

from . import errors as errors

__version__: str

# hook protocol
from .checkpoint.management.checkpoint_files import (
    checkpoint_exists as checkpoint_exists,
)
from .checkpoint.management.checkpoint_files import (
    get_checkpoint_mtimes as get_checkpoint_mtimes,
)
from .checkpoint.management.checkpoint_files import (
    remove_checkpoint as remove_checkpoint,
)
from .checkpoint.management.state_file import (
    CheckpointState as CheckpointState,
)
from .checkpoint.management.state_file import (
    get_checkpoint_state as get_checkpoint_state,
)
from .checkpoint.management.state_file import (
    latest_checkpoint as latest_checkpoint,
)
from .checkpoint.management.state_file import (
    update_checkpoint_state as update_checkpoint_state,
)
from .checkpoint.reader import (
    list_variables as list_variables,
)
from .checkpoint.reader import (
    load_checkpoint as load_checkpoint,
)
from .checkpoint.reader import (
    load_variable as load_variable,
)
from .checkpoint.rng import (
    RNGState as RNGState,
)
from .checkpoint.rng import (
    capture_rng_state as capture_rng_state,
)
from .checkpoint.rng import (
    restore_rng_state as restore_rng_state,
)
from .checkpoint.per_rank import (
    PerRank as PerRank,
)

# checkpoints
from .checkpoint.saver import (
    Saver as Saver,
)
from .checkpoint.distributed.torch_group import (
    TorchProcessGroup as TorchProcessGroup,
)
from .checkpoint.state.tree import (
    RestoreReport as RestoreReport,
)
from .checkpoint.weights import (
    load_state_dict as load_state_dict,
)
from .checkpoint.weights import (
    load_values as load_values,
)
from .hooks.basic import (
    FeedFnHook as FeedFnHook,
)
from .hooks.basic import (
    FinalOpsHook as FinalOpsHook,
)
from .hooks.basic import (
    GlobalStepWaiterHook as GlobalStepWaiterHook,
)
from .hooks.basic import (
    StepCounterHook as StepCounterHook,
)
from .hooks.basic import (
    StopAtStepHook as StopAtStepHook,
)
from .hooks.checkpoint import (
    CheckpointSaverHook as CheckpointSaverHook,
)
from .hooks.checkpoint import (
    CheckpointSaverListener as CheckpointSaverListener,
)
from .hooks.listeners.backup import (
    BackupListener as BackupListener,
)
from .hooks.listeners.evaluation import (
    EvaluationListener as EvaluationListener,
)
from .hooks.listeners.keep_best import (
    KeepBestListener as KeepBestListener,
)
from .hooks.listeners.upload import (
    UploadListener as UploadListener,
)
from .hooks.profiler import (
    ProfilerHook as ProfilerHook,
)
from .hooks.summary import (
    SummarySaverHook as SummarySaverHook,
)
from .hooks.tensors import (
    LoggingTensorHook as LoggingTensorHook,
)
from .hooks.tensors import (
    NanLossDuringTrainingError as NanLossDuringTrainingError,
)
from .hooks.tensors import (
    NanTensorHook as NanTensorHook,
)

# hooks
from .hooks.timers import (
    NeverTriggerTimer as NeverTriggerTimer,
)
from .hooks.timers import (
    SecondOrStepTimer as SecondOrStepTimer,
)
from .session.coordinator import (
    Coordinator as Coordinator,
)
from .session.creators import (
    ChiefSessionCreator as ChiefSessionCreator,
)
from .session.creators import (
    Scaffold as Scaffold,
)
from .session.creators import (
    WorkerSessionCreator as WorkerSessionCreator,
)
from .session.monitored import (
    MonitoredSession as MonitoredSession,
)
from .session.monitored import (
    SingularMonitoredSession as SingularMonitoredSession,
)
from .session.monitored import (
    StepContext as StepContext,
)
from .session.run_hook import (
    SessionRunArgs as SessionRunArgs,
)
from .session.run_hook import (
    SessionRunContext as SessionRunContext,
)
from .session.run_hook import (
    SessionRunHook as SessionRunHook,
)
from .session.run_hook import (
    SessionRunValues as SessionRunValues,
)

# sessions
from .session.session import (
    Session as Session,
)
from .training import (
    MonitoredTrainingSession as MonitoredTrainingSession,
)
