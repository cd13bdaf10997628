"""``KeepBestListener``: keep the best N checkpoints by a metric, beyond ``max_to_keep``."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from typing import NamedTuple

from trainhooks.checkpoint.format.manifest_decode import is_plain_basename
from trainhooks.checkpoint.management.state_file import update_checkpoint_state
from trainhooks.checkpoint.storage import storage_for
from trainhooks.checkpoint.storage.commit import delete_checkpoint
from trainhooks.checkpoint.storage.resolve import is_url
from trainhooks.hooks.listeners.durable import (
    clean_leftovers,
    place_checkpoint,
    write_json_durably,
)
from trainhooks.hooks.listeners.hook_bound import HookBoundListener
from trainhooks.session.session import Session

__all__ = ["BestCheckpoint", "KeepBestListener"]

logger = logging.getLogger(__name__)

#: The ranking file lists a few checkpoints and their metrics; anything larger is not one.
_MAX_METRICS_BYTES = 16 * 2**20


class BestCheckpoint(NamedTuple):
    """A checkpoint kept by :class:`KeepBestListener`."""

    checkpoint_path: str
    global_step: int
    metric: float


class KeepBestListener(HookBoundListener):
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
        from trainhooks import _checks

        _checks.function(
            "metric_fn", metric_fn, example="lambda prefix, step: validation_loss(prefix)"
        )
        _checks.positive_int("keep", keep, allow_none=False, example=3)
        _checks.string("mode", mode, example="'min'")
        _checks.string("subdir", subdir, allow_empty=False, example="'best'")
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
        directory = self._hook().checkpoint_dir
        directory = directory if is_url(directory) else os.path.abspath(directory)
        return os.path.join(directory, self.subdir)

    @property
    def best(self) -> list[BestCheckpoint]:
        """The kept checkpoints, best first."""
        return list(self._kept)

    def begin(self) -> None:
        """Create the directory of the best checkpoints, clean up after a crash, load the list."""
        storage_for(self.best_dir).makedirs(self.best_dir)
        clean_leftovers(self.best_dir)
        self._kept = self._load()

    def after_save(self, session: Session, global_step_value: int) -> None:
        """Score the checkpoint just committed; copy it in if it ranks among the best ``keep``."""
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
        place_checkpoint(source, entry.checkpoint_path, hard_link=True)
        write_json_durably(
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
                try:  # a directory holding anything but a checkpoint's files stays
                    delete_checkpoint(dropped.checkpoint_path)
                except (OSError, ValueError) as e:
                    logger.warning("Not deleting %s: %s", dropped.checkpoint_path, e)
        self._kept = kept
        return None

    def _load(self) -> list[BestCheckpoint]:
        path = os.path.join(self.best_dir, self.METRICS_FILE)
        storage = storage_for(path)
        if not storage.exists(path):
            return []
        record = json.loads(storage.read_bytes(path, max_bytes=_MAX_METRICS_BYTES))
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
            # The ranking file is data: only plain names inside best_dir count.
            if is_plain_basename(e.get("name")) and e["name"] != self.METRICS_FILE
        ]
        return [e for e in kept if storage.is_dir(e.checkpoint_path)]
