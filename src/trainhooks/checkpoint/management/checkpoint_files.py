"""Which files make a checkpoint at a prefix: trainhooks' directory or TensorFlow's files.

``checkpoint_exists``, ``get_checkpoint_mtimes`` and ``remove_checkpoint`` follow
``tf.compat.v1.train``'s ``checkpoint_management`` and accept both kinds, so a
directory TensorFlow wrote can be managed (and pruned by a ``Saver``) as well.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from trainhooks.checkpoint.storage import storage_for
from trainhooks.checkpoint.storage.commit import MANIFEST_NAME, delete_checkpoint, is_checkpoint

__all__ = [
    "V1",
    "V2",
    "checkpoint_exists",
    "find_checkpoints",
    "get_checkpoint_mtimes",
    "remove_checkpoint",
]

#: ``SaverDef`` format versions, for :func:`remove_checkpoint`.
V1 = 1
V2 = 2

StrPath = str | os.PathLike[str]


def _existing_checkpoint_file(prefix: str) -> str | None:
    """The file whose presence (and mtime) stands for the checkpoint at ``prefix``.

    A trainhooks checkpoint directory counts only once its manifest is committed.
    TensorFlow's V2 ``<prefix>.index`` comes next, then a V1 file at ``<prefix>``.
    Paths are taken literally, not as glob patterns.
    """
    storage = storage_for(prefix)
    if storage.is_dir(prefix):
        if is_checkpoint(prefix, storage=storage):
            return os.path.join(prefix, MANIFEST_NAME)
        return None
    if storage.version(prefix + ".index") is not None:
        return prefix + ".index"
    if storage.version(prefix) is not None:
        return prefix
    return None


_NUMBERED = re.compile(r".+-(?P<step>\d+)")


def find_checkpoints(directory: StrPath) -> list[str]:
    """The committed trainhooks checkpoints in ``directory`` named ``<name>-<step>``, oldest
    step first, found by listing it (for when its state file is lost or unreadable).

    Example:
        >>> find_checkpoints("/nonexistent")
        []
    """
    directory = os.fspath(directory)
    storage = storage_for(directory)
    try:
        names = storage.list_dir(directory or os.curdir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        match = _NUMBERED.fullmatch(name)
        path = os.path.join(directory, name)
        if match is not None and is_checkpoint(path, storage=storage):
            found.append((int(match["step"]), name, path))
    return [path for _, _, path in sorted(found)]


def checkpoint_exists(checkpoint_prefix: StrPath) -> bool:
    """Whether a checkpoint exists at ``checkpoint_prefix``.

    Args:
      checkpoint_prefix: a prefix as returned by ``Saver.save`` or ``latest_checkpoint``.

    Returns:
      True for a committed trainhooks checkpoint directory, TensorFlow's
      ``<prefix>.index``, or a file at the prefix (TensorFlow V1).

    Example:
        >>> checkpoint_exists("/tmp/run/model.ckpt-10")  # doctest: +SKIP
        True
    """
    return _existing_checkpoint_file(os.fspath(checkpoint_prefix)) is not None


def get_checkpoint_mtimes(checkpoint_prefixes: Iterable[StrPath]) -> list[float]:
    """The modification times, in seconds since the epoch, of the given checkpoints.

    A trainhooks checkpoint's time is its manifest's (written last, at commit);
    TensorFlow's is its ``.index`` file's. Missing checkpoints are skipped, so the list
    can be shorter than the input.

    Args:
      checkpoint_prefixes: checkpoint prefixes.

    Returns:
      One float per existing checkpoint, in input order.

    Example:
        >>> get_checkpoint_mtimes(["/tmp/run/model.ckpt-10"])  # doctest: +SKIP
        [1700000000.123456]
    """
    mtimes = []
    for prefix in checkpoint_prefixes:
        path = _existing_checkpoint_file(os.fspath(prefix))
        if path is None:
            continue
        try:
            mtimes.append(storage_for(path).mtime(path))
        except FileNotFoundError:  # deleted concurrently: as good as missing
            continue
    return mtimes


def remove_checkpoint(
    checkpoint_prefix: StrPath,
    checkpoint_format_version: int = V2,
    meta_graph_suffix: str = "meta",
) -> None:
    """Delete the checkpoint at ``checkpoint_prefix``.

    A trainhooks checkpoint directory is removed whole. TensorFlow's files are removed
    as TF does: ``<prefix>.meta`` (shard suffix stripped), and ``<prefix>.index`` plus
    ``<prefix>.data-?????-of-?????`` for V2 or ``<prefix>`` for V1. Missing files are
    not an error.

    Args:
      checkpoint_prefix: the prefix to delete.
      checkpoint_format_version: TensorFlow's ``SaverDef`` version (1 or 2) for TF files.
      meta_graph_suffix: the suffix of TensorFlow's meta graph file.

    Example:
        >>> remove_checkpoint("/tmp/run/model.ckpt-10")  # doctest: +SKIP
    """
    prefix = os.fspath(checkpoint_prefix)
    storage = storage_for(prefix)
    if storage.is_dir(prefix):
        delete_checkpoint(prefix, storage=storage)
    storage.delete(_meta_graph_filename(prefix, meta_graph_suffix))
    if checkpoint_format_version == V2:
        storage.delete(prefix + ".index")
        parent, base = os.path.split(prefix)
        shards = re.compile(re.escape(base) + r"\.data-.{5}-of-.{5}")
        try:
            names = storage.list_dir(parent or os.curdir)
        except (FileNotFoundError, NotADirectoryError):
            names = []
        for name in names:
            if shards.fullmatch(name):
                storage.delete(os.path.join(parent, name))
    elif storage.version(prefix) is not None:
        storage.delete(prefix)


def _meta_graph_filename(prefix: str, suffix: str) -> str:
    return re.sub(r"-[\d\?]+-of-\d+$", "", prefix) + "." + suffix
