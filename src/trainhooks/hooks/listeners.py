"""Three ready-made ``CheckpointSaverListener``s: back up, evaluate, keep the best.

Each one learns the checkpoint directory and the path of the checkpoint just
committed from the :class:`~trainhooks.CheckpointSaverHook` it is given to
(``listeners=[...]``), and acts in ``after_save``, which runs on the training thread
once the checkpoint is complete.

* :class:`BackupListener` mirrors every checkpoint into a second directory.
* :class:`EvaluationListener` runs an evaluation on new checkpoints and can stop training.
* :class:`KeepBestListener` keeps the best N checkpoints by a metric, out of reach of
  the Saver's ``max_to_keep``.

A copy is made durable the way the Saver commits (DESIGN §3): files are written into
a temporary directory and fsynced, the directory is renamed into place, the parent is
fsynced, and only then is the state file replaced; entries it no longer lists are
deleted last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

from trainhooks.checkpoint.state_file import get_checkpoint_state, update_checkpoint_state
from trainhooks.hooks.checkpoint import CheckpointSaverHook, CheckpointSaverListener
from trainhooks.hooks.timers import SecondOrStepTimer
from trainhooks.session.session import Session

__all__ = [
    "BackupListener",
    "BestCheckpoint",
    "Evaluation",
    "EvaluationListener",
    "KeepBestListener",
]

logger = logging.getLogger(__name__)

_PARTIAL = ".partial-"  # a copy being written
_REPLACED = ".replaced-"  # an older copy moved aside while its replacement is renamed in


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_file_durably(src: str, dst: str) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _place_checkpoint(src: str, dst: str, *, hard_link: bool) -> None:
    """Make ``dst`` a durable copy of the checkpoint directory ``src``, replacing it if present.

    With ``hard_link`` every file is hard-linked (the Saver already fsynced its data),
    falling back to a copy where the file system refuses links.
    """
    parent = os.path.dirname(dst)
    tmp = f"{dst}{_PARTIAL}{uuid.uuid4().hex}"
    for root, _, files in os.walk(src):
        target = os.path.join(tmp, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            src_file, dst_file = os.path.join(root, name), os.path.join(target, name)
            if hard_link:
                try:
                    os.link(src_file, dst_file)
                    continue
                except OSError:  # another device, or links unsupported: copy instead
                    pass
            _copy_file_durably(src_file, dst_file)
        _fsync_dir(target)
    replaced = None
    if os.path.lexists(dst):
        # A directory cannot be renamed over a non-empty one: move the old copy aside.
        replaced = f"{dst}{_REPLACED}{uuid.uuid4().hex}"
        os.rename(dst, replaced)
    os.rename(tmp, dst)
    _fsync_dir(parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def _clean_leftovers(directory: str) -> None:
    """Remove partial copies a crash left in ``directory``; put back a copy moved aside."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _PARTIAL in name:
            shutil.rmtree(path, ignore_errors=True)
        elif _REPLACED in name:
            original = os.path.join(directory, name.split(_REPLACED)[0])
            if os.path.lexists(original):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, original)


def _write_json_durably(path: str, value: Any) -> None:
    tmp = f"{path}{_PARTIAL}{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


class _HookBound(CheckpointSaverListener):
    """A listener that reads the committed checkpoint's path from its hook."""

    def _hook(self) -> CheckpointSaverHook:
        hook = getattr(self, "hook", None)
        if hook is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a CheckpointSaverHook: pass it as "
                "CheckpointSaverHook(checkpoint_dir, ..., listeners=[listener])."
            )
        return hook

    def _committed_checkpoint(self, step: int) -> str:
        path = self._hook().last_checkpoint_path
        if path is None:
            raise RuntimeError(
                f"{type(self).__name__}: the hook reports no checkpoint for step {step}; the "
                "Saver returned no path (a Saver with nothing to save?)."
            )
        return str(path)


class BackupListener(_HookBound):
    """Mirrors every committed checkpoint into ``backup_dir``, with its own state file.

    After each save the checkpoint directory is copied into ``backup_dir`` (into a
    temporary directory, every file fsynced, then renamed), then ``backup_dir/checkpoint``
    is updated with :func:`~trainhooks.update_checkpoint_state`, so
    ``latest_checkpoint(backup_dir)`` names the newest backup and a session can restore
    from ``backup_dir`` as from the primary directory. Then, unless ``keep_all``, the
    backups that the primary state file no longer lists are deleted, so the backup
    keeps what the Saver's retention keeps. Only backups this listener listed are
    ever deleted.

    Args:
      backup_dir: the second directory (e.g. on another disk or a mounted bucket).
      keep_all: keep every backup instead of following the primary's retention.

    Example:
        >>> import trainhooks as th
        >>> hook = th.CheckpointSaverHook(
        ...     "/tmp/ckpt", save_steps=100, listeners=[th.BackupListener("/mnt/backup")])
    """

    def __init__(self, backup_dir: str | os.PathLike[str], *, keep_all: bool = False) -> None:
        self.backup_dir = os.path.abspath(os.fspath(backup_dir))
        self.keep_all = keep_all

    def begin(self) -> None:
        os.makedirs(self.backup_dir, exist_ok=True)
        _clean_leftovers(self.backup_dir)

    def after_save(self, session: Session, global_step_value: int) -> None:
        source = self._committed_checkpoint(global_step_value)
        name = os.path.basename(source)
        previous = self._listed(self.backup_dir)
        _place_checkpoint(source, os.path.join(self.backup_dir, name), hard_link=False)
        wanted = previous if self.keep_all else self._listed(os.path.dirname(source))
        names = [n for n in wanted if n != name and self._has_backup(n)] + [name]
        update_checkpoint_state(
            self.backup_dir,
            os.path.join(self.backup_dir, name),
            all_model_checkpoint_paths=[os.path.join(self.backup_dir, n) for n in names],
        )
        for stale in previous:
            if stale not in names:
                shutil.rmtree(os.path.join(self.backup_dir, stale), ignore_errors=True)
        return None

    def _has_backup(self, name: str) -> bool:
        return os.path.isdir(os.path.join(self.backup_dir, name))

    @staticmethod
    def _listed(directory: str) -> list[str]:
        state = get_checkpoint_state(directory)
        if state is None:
            return []
        return [os.path.basename(p) for p in state.all_model_checkpoint_paths]


class Evaluation(NamedTuple):
    """One result of :class:`EvaluationListener`: the step, the checkpoint, what ``eval_fn`` returned."""

    global_step: int
    checkpoint_path: str
    result: Any


class EvaluationListener(_HookBound):
    """Runs ``eval_fn(checkpoint_prefix, global_step)`` on new checkpoints; may stop training.

    Without ``every_n_steps`` it evaluates every checkpoint whose step it has not
    evaluated yet (the save at session creation included; the re-save of the same
    step after a recovery is skipped). With ``every_n_steps=N`` it evaluates the first
    checkpoint, then the first one at least N steps after the last one evaluated, and in
    ``end`` the final checkpoint if that step was not evaluated yet (never twice).

    Every result is kept in :attr:`results`. When ``stop_if(result)`` is truthy,
    ``after_save`` returns True and the hook requests a stop after the current step.

    Args:
      eval_fn: ``eval_fn(checkpoint_prefix, global_step) -> result``; the prefix is a
        complete checkpoint (e.g. ``Saver().restore(eval_session, prefix)``).
      every_n_steps: evaluate at most once every this many steps (a positive int).
      stop_if: ``stop_if(result) -> bool``; truthy stops training.

    Example:
        >>> import trainhooks as th
        >>> evaluator = th.EvaluationListener(
        ...     lambda prefix, step: {"loss": evaluate(prefix)},
        ...     every_n_steps=1000, stop_if=lambda r: r["loss"] < 0.01)
        >>> hook = th.CheckpointSaverHook("/tmp/ckpt", save_steps=100, listeners=[evaluator])
    """

    def __init__(
        self,
        eval_fn: Callable[[str, int], Any],
        *,
        every_n_steps: int | None = None,
        stop_if: Callable[[Any], Any] | None = None,
    ) -> None:
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ValueError(
                f"every_n_steps must be a positive int or None (every checkpoint), got {every_n_steps!r}."
            )
        self.eval_fn = eval_fn
        self.stop_if = stop_if
        self.results: list[Evaluation] = []
        self._timer = SecondOrStepTimer(every_steps=every_n_steps if every_n_steps else 0)

    def after_save(self, session: Session, global_step_value: int) -> bool:
        if not self._timer.should_trigger_for_step(global_step_value):
            return False
        result = self._evaluate(global_step_value)
        return bool(self.stop_if is not None and self.stop_if(result))

    def end(self, session: Session, global_step_value: int) -> None:
        # The hook guarantees a checkpoint at the final step by now.
        if self._timer.last_triggered_step() != global_step_value:
            self._evaluate(global_step_value)

    def _evaluate(self, step: int) -> Any:
        path = self._committed_checkpoint(step)
        self._timer.update_last_triggered_step(step)
        result = self.eval_fn(path, step)
        self.results.append(Evaluation(step, path, result))
        return result


class BestCheckpoint(NamedTuple):
    """A checkpoint kept by :class:`KeepBestListener`."""

    checkpoint_path: str
    global_step: int
    metric: float


class KeepBestListener(_HookBound):
    """Keeps the ``keep`` best checkpoints by a metric in ``<checkpoint_dir>/<subdir>``.

    After each save (each step once per process) it computes
    ``metric_fn(checkpoint_prefix, global_step)``; if the checkpoint ranks among the
    best ``keep`` it is placed in the ``best`` directory by hard links (copies where
    links are not possible), so the Saver's ``max_to_keep`` cannot delete it, and the
    checkpoint it pushes out is deleted. A NaN metric is never kept.

    The ``best`` directory is a checkpoint directory of its own: its ``checkpoint``
    state file lists the kept checkpoints **from worst to best**, so that its
    ``model_checkpoint_path``, and ``latest_checkpoint(best_dir)``, name the **best**
    one. ``best_checkpoints.json`` there holds each one's step and metric, and lets a
    restarted job carry on ranking. Ties keep the earlier step.

    Args:
      metric_fn: ``metric_fn(checkpoint_prefix, global_step) -> float``.
      keep: how many checkpoints to keep (a positive int).
      mode: ``"min"`` (lower is better, e.g. a loss) or ``"max"``.
      subdir: the directory under the hook's ``checkpoint_dir``.

    Example:
        >>> import trainhooks as th
        >>> best = th.KeepBestListener(lambda prefix, step: validation_loss(prefix), keep=3)
        >>> hook = th.CheckpointSaverHook("/tmp/ckpt", save_steps=100, listeners=[best])
        >>> # later: th.Saver().restore(sess, th.latest_checkpoint("/tmp/ckpt/best"))
    """

    METRICS_FILE = "best_checkpoints.json"

    def __init__(
        self,
        metric_fn: Callable[[str, int], float],
        keep: int = 3,
        mode: str = "min",
        subdir: str = "best",
    ) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}.")
        if mode not in ("min", "max"):
            raise ValueError(f'mode must be "min" or "max", got {mode!r}.')
        if not subdir or os.path.isabs(subdir) or os.pardir in subdir.split(os.sep):
            raise ValueError(
                f"subdir must be a relative directory name inside checkpoint_dir, got {subdir!r}."
            )
        self.metric_fn = metric_fn
        self.keep = keep
        self.mode = mode
        self.subdir = subdir
        self._kept: list[BestCheckpoint] = []
        self._last_scored_step: int | None = None

    @property
    def best_dir(self) -> str:
        """``<checkpoint_dir>/<subdir>``."""
        return os.path.join(os.path.abspath(self._hook().checkpoint_dir), self.subdir)

    @property
    def best(self) -> list[BestCheckpoint]:
        """The kept checkpoints, best first."""
        return list(self._kept)

    def begin(self) -> None:
        os.makedirs(self.best_dir, exist_ok=True)
        _clean_leftovers(self.best_dir)
        self._kept = self._load()

    def after_save(self, session: Session, global_step_value: int) -> None:
        if global_step_value == self._last_scored_step:
            return None
        source = self._committed_checkpoint(global_step_value)
        metric = float(self.metric_fn(source, global_step_value))
        self._last_scored_step = global_step_value
        if math.isnan(metric):
            logger.warning("Not keeping checkpoint %s: its metric is NaN.", source)
            return None
        name = os.path.basename(source)
        entry = BestCheckpoint(os.path.join(self.best_dir, name), global_step_value, metric)
        sign = 1.0 if self.mode == "min" else -1.0
        candidates = [e for e in self._kept if e.checkpoint_path != entry.checkpoint_path]
        ranked = sorted([*candidates, entry], key=lambda e: (sign * e.metric, e.global_step))
        kept = ranked[: self.keep]
        if entry not in kept:
            return None
        _place_checkpoint(source, entry.checkpoint_path, hard_link=True)
        _write_json_durably(
            os.path.join(self.best_dir, self.METRICS_FILE),
            {
                "mode": self.mode,
                "checkpoints": [
                    {
                        "name": os.path.basename(e.checkpoint_path),
                        "step": e.global_step,
                        "metric": e.metric,
                    }
                    for e in kept
                ],
            },
        )
        update_checkpoint_state(
            self.best_dir,
            kept[0].checkpoint_path,
            all_model_checkpoint_paths=[e.checkpoint_path for e in reversed(kept)],
        )
        for dropped in self._kept:
            if dropped.checkpoint_path not in {e.checkpoint_path for e in kept}:
                shutil.rmtree(dropped.checkpoint_path, ignore_errors=True)
        self._kept = kept
        return None

    def _load(self) -> list[BestCheckpoint]:
        path = os.path.join(self.best_dir, self.METRICS_FILE)
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("mode") != self.mode:
            raise ValueError(
                f"{path} ranks checkpoints with mode={record.get('mode')!r}, but this "
                f"KeepBestListener has mode={self.mode!r}: pass mode={record.get('mode')!r} "
                "or choose another subdir."
            )
        kept = [
            BestCheckpoint(
                os.path.join(self.best_dir, e["name"]), int(e["step"]), float(e["metric"])
            )
            for e in record["checkpoints"]
        ]
        return [e for e in kept if os.path.isdir(e.checkpoint_path)]
