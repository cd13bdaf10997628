"""Four ready-made ``CheckpointSaverListener``s: back up, upload, evaluate, keep the best.

Each one learns the checkpoint directory and the path of the checkpoint just
committed from the :class:`~trainhooks.CheckpointSaverHook` it is given to
(``listeners=[...]``), and acts in ``after_save``, which runs on the training thread
once the checkpoint is complete.

* :class:`BackupListener` (``backup.py``) mirrors every checkpoint into a second directory.
* :class:`UploadListener` (``upload.py``) uploads every checkpoint to object storage in
  the background (``remote_copy.py`` copies one with the store's own commit).
* :class:`EvaluationListener` (``evaluation.py``) runs an evaluation on new checkpoints
  and can stop training.
* :class:`KeepBestListener` (``keep_best.py``) keeps the best N checkpoints by a metric,
  out of reach of the Saver's ``max_to_keep``.

A copy is made durable the way the Saver commits (``docs/format.md``): files are written into
a temporary directory and fsynced, the directory is renamed into place, the parent is
fsynced, and only then is the state file replaced; entries it no longer lists are
deleted last (``durable.py``).
"""

from trainhooks.hooks.listeners.backup import BackupListener
from trainhooks.hooks.listeners.evaluation import Evaluation, EvaluationListener
from trainhooks.hooks.listeners.keep_best import BestCheckpoint, KeepBestListener
from trainhooks.hooks.listeners.upload import UploadListener

__all__ = [
    "BackupListener",
    "BestCheckpoint",
    "Evaluation",
    "EvaluationListener",
    "KeepBestListener",
    "UploadListener",
]
