"""The checkpoint state file: TensorFlow's ``CheckpointState`` in protobuf text format.

A directory of checkpoints holds one small text file, ``checkpoint`` by default, that
names the newest checkpoint and the ones retention still tracks, oldest first::

    model_checkpoint_path: "/abs/dir/model.ckpt-20"
    all_model_checkpoint_paths: "/abs/dir/model.ckpt-10"
    all_model_checkpoint_paths: "/abs/dir/model.ckpt-20"

The file is byte-for-byte what TensorFlow writes, so ``tf.train.latest_checkpoint`` reads
a trainhooks directory and these functions read a TensorFlow one. The functions follow
``tf.compat.v1.train``'s ``checkpoint_management`` exactly; a checkpoint here is either a
trainhooks checkpoint directory at the prefix or TensorFlow's own ``<prefix>.index`` /
``<prefix>`` files (``checkpoint_files.py`` tells them apart; its functions are
re-exported here, where TF users look for them).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from trainhooks.checkpoint.management._text_format import (
    CheckpointStateParseError,
    format_state,
    parse_state,
)
from trainhooks.checkpoint.management.checkpoint_files import (
    checkpoint_exists,
    find_checkpoints,
    get_checkpoint_mtimes,
    remove_checkpoint,
)
from trainhooks.checkpoint.storage import PreconditionFailed, storage_for
from trainhooks.checkpoint.storage.resolve import is_url

__all__ = [
    "CheckpointState",
    "CheckpointStateParseError",
    "checkpoint_exists",
    "find_checkpoints",
    "generate_checkpoint_state_proto",
    "get_checkpoint_mtimes",
    "get_checkpoint_state",
    "inside_by_name",
    "latest_checkpoint",
    "remove_checkpoint",
    "update_checkpoint_state",
]

logger = logging.getLogger(__name__)

#: The state file's name when ``latest_filename`` is not given.
DEFAULT_LATEST_FILENAME = "checkpoint"

StrPath = str | os.PathLike[str]


@dataclass
class CheckpointState:
    """TensorFlow's ``CheckpointState`` message: which checkpoints a directory holds.

    ``str(state)`` is the protobuf text format that is written to the state file.

    Attributes:
      model_checkpoint_path: the newest checkpoint's prefix.
      all_model_checkpoint_paths: the prefixes retention tracks, oldest first; the last
        one is ``model_checkpoint_path``.
      all_model_checkpoint_timestamps: seconds since the epoch, one per path, or empty.
      last_preserved_timestamp: the time of the last checkpoint kept for good (0.0: none).

    Example:
        >>> print(CheckpointState("ckpt/m-2", ["ckpt/m-1", "ckpt/m-2"]), end="")
        model_checkpoint_path: "ckpt/m-2"
        all_model_checkpoint_paths: "ckpt/m-1"
        all_model_checkpoint_paths: "ckpt/m-2"
    """

    model_checkpoint_path: str = ""
    all_model_checkpoint_paths: list[str] = field(default_factory=list)
    all_model_checkpoint_timestamps: list[float] = field(default_factory=list)
    last_preserved_timestamp: float = 0.0

    def __str__(self) -> str:
        return format_state(self)

    @classmethod
    def from_text(cls, text: str | bytes) -> CheckpointState:
        """Parse the protobuf text format; raises :class:`CheckpointStateParseError`.

        Example:
            >>> CheckpointState.from_text('model_checkpoint_path: "m-1"').model_checkpoint_path
            'm-1'
        """
        return parse_state(text)


def _state_filename(save_dir: str, latest_filename: str | None) -> str:
    return os.path.join(save_dir, latest_filename or DEFAULT_LATEST_FILENAME)


def generate_checkpoint_state_proto(
    save_dir: StrPath,
    model_checkpoint_path: StrPath,
    all_model_checkpoint_paths: Sequence[StrPath] | None = None,
    all_model_checkpoint_timestamps: Sequence[float] | None = None,
    last_preserved_timestamp: float | None = None,
) -> CheckpointState:
    """Build the :class:`CheckpointState` that :func:`update_checkpoint_state` writes.

    The model path is appended to ``all_model_checkpoint_paths`` unless it is already
    the last entry. When ``save_dir`` is relative, relative paths are rewritten relative
    to it (``"train/model-0"`` in ``"train"`` becomes ``"model-0"``); absolute ones are kept.

    Args:
      save_dir: the directory the state file lives in.
      model_checkpoint_path: the newest checkpoint's prefix.
      all_model_checkpoint_paths: the prefixes retention tracks, oldest first.
      all_model_checkpoint_timestamps: one time per path (after the model path is appended).
      last_preserved_timestamp: the time of the last checkpoint kept for good.

    Returns:
      The state, not yet written anywhere.

    Example:
        >>> generate_checkpoint_state_proto("train", "train/model-0").model_checkpoint_path
        'model-0'
    """
    save_dir = os.fspath(save_dir)
    model_path = os.fspath(model_checkpoint_path)
    paths = [os.fspath(p) for p in all_model_checkpoint_paths or ()]
    if not paths or paths[-1] != model_path:
        logger.info("%s is not in all_model_checkpoint_paths. Manually adding it.", model_path)
        paths.append(model_path)
    timestamps = [float(t) for t in all_model_checkpoint_timestamps or ()]
    if timestamps and len(timestamps) != len(paths):
        raise ValueError(
            "Checkpoint timestamps, if provided, must match checkpoint paths (got paths "
            f"{paths} and timestamps {timestamps})"
        )
    if not _isabs(save_dir):
        base = save_dir or os.curdir  # "" (the cwd) would make os.path.relpath raise
        if not _isabs(model_path):
            model_path = os.path.relpath(model_path, base)
        paths = [p if _isabs(p) else os.path.relpath(p, base) for p in paths]
    return CheckpointState(
        model_checkpoint_path=model_path,
        all_model_checkpoint_paths=paths,
        all_model_checkpoint_timestamps=timestamps,
        last_preserved_timestamp=float(last_preserved_timestamp or 0.0),
    )


def update_checkpoint_state(
    save_dir: StrPath,
    model_checkpoint_path: StrPath,
    all_model_checkpoint_paths: Sequence[StrPath] | None = None,
    latest_filename: str | None = None,
    all_model_checkpoint_timestamps: Sequence[float] | None = None,
    last_preserved_timestamp: float | None = None,
    *,
    save_relative_paths: bool = False,
) -> None:
    """Replace the state file in ``save_dir`` atomically.

    The text goes to a temporary file in the same directory, which is fsynced and
    renamed over the state file; the directory is then fsynced. A reader sees the old
    file or the new one, never a mix, even across a crash.

    Args:
      save_dir: the directory to write the state file in.
      model_checkpoint_path: the newest checkpoint's prefix.
      all_model_checkpoint_paths: the prefixes retention tracks, oldest first.
      latest_filename: the state file's name (default ``"checkpoint"``).
      all_model_checkpoint_timestamps: one time per path, or None.
      last_preserved_timestamp: the time of the last checkpoint kept for good, or None.
      save_relative_paths: write every absolute path relative to ``save_dir``, so the
        directory can be moved.

    Raises:
      RuntimeError: the state file's path is the model checkpoint path itself.

    Example:
        >>> update_checkpoint_state("/tmp/run", "/tmp/run/model.ckpt-10")  # doctest: +SKIP
    """
    save_dir = os.fspath(save_dir)
    model_path = os.fspath(model_checkpoint_path)
    paths = [os.fspath(p) for p in all_model_checkpoint_paths or ()]
    if save_relative_paths:
        model_path = _relative_to(model_path, save_dir)
        paths = [_relative_to(p, save_dir) for p in paths]
    ckpt = generate_checkpoint_state_proto(
        save_dir,
        model_path,
        all_model_checkpoint_paths=paths,
        all_model_checkpoint_timestamps=all_model_checkpoint_timestamps,
        last_preserved_timestamp=last_preserved_timestamp,
    )
    state_filename = _state_filename(save_dir, latest_filename)
    if state_filename == ckpt.model_checkpoint_path:
        raise RuntimeError(
            f"Save path '{os.fspath(model_checkpoint_path)}' conflicts with path used for "
            "checkpoint state.  Please use a different save path."
        )
    _atomic_write(state_filename, str(ckpt).encode("utf-8"))


def _isabs(path: str) -> bool:
    """Absolute: a local absolute path, or a URL (``memory://bucket/run/...``)."""
    return os.path.isabs(path) or is_url(path)


def _relative_to(path: str, save_dir: str) -> str:
    return os.path.relpath(path, save_dir or os.curdir) if _isabs(path) else path


# On an object store: the version of each state file this process last wrote, so the
# next write is a compare-and-swap against it and another writer's update is never
# silently overwritten.
_written_versions: dict[str, str | None] = {}


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old content or the new one.

    On a store without rename (an object store), the put is conditional: on the version
    this process last wrote, else on the version there now (create-only if none).
    """
    storage = storage_for(path)
    try:
        if storage.can_rename:
            storage.put(path, data)
            return
        seen = _written_versions[path] if path in _written_versions else storage.version(path)
        try:
            if seen is None:
                storage.put(path, data, if_absent=True)
            else:
                storage.put(path, data, if_version=seen)
        except (FileExistsError, PreconditionFailed):
            _written_versions.pop(path, None)
            raise PreconditionFailed(
                errno.EAGAIN,
                "another process changed the checkpoint state file since this one last "
                "wrote it (two writers on one directory?); not overwriting it",
                path,
            ) from None
        _written_versions[path] = storage.version(path)
    except OSError as e:
        if e.errno is None:
            raise
        # Same errno (callers may test for ENOSPC), a message that names the file.
        raise type(e)(
            e.errno,
            f"{e.strerror}: could not write the checkpoint state file {path}; the "
            "previous state file is unchanged",
        ) from e


def get_checkpoint_state(
    checkpoint_dir: StrPath, latest_filename: str | None = None
) -> CheckpointState | None:
    """Read the state file in ``checkpoint_dir``.

    Relative paths in the file are returned joined with ``checkpoint_dir``
    (``"./m-1"`` becomes ``"<dir>/./m-1"``, not normalised).

    Args:
      checkpoint_dir: the directory holding the state file.
      latest_filename: the state file's name (default ``"checkpoint"``).

    Returns:
      The state, or None when there is no state file, or it cannot be read or parsed
      (a WARNING says why).

    Raises:
      ValueError: the file parses but names no model checkpoint (an empty file).

    Example:
        >>> ckpt = get_checkpoint_state("/tmp/run")  # doctest: +SKIP
        >>> ckpt.model_checkpoint_path if ckpt else None  # doctest: +SKIP
        '/tmp/run/model.ckpt-10'
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    state_filename = _state_filename(checkpoint_dir, latest_filename)
    if not storage_for(state_filename).exists(state_filename):
        return None
    try:
        ckpt = CheckpointState.from_text(_read_state_file(state_filename))
    except (OSError, CheckpointStateParseError) as e:
        logger.warning("%s: %s", type(e).__name__, e)
        logger.warning("%s: Checkpoint ignored", state_filename)
        return None
    if not ckpt.model_checkpoint_path:
        raise ValueError(f"Invalid checkpoint state loaded from {checkpoint_dir}")
    if not _isabs(ckpt.model_checkpoint_path):
        ckpt.model_checkpoint_path = os.path.join(checkpoint_dir, ckpt.model_checkpoint_path)
    ckpt.all_model_checkpoint_paths = [
        p if _isabs(p) else os.path.join(checkpoint_dir, p) for p in ckpt.all_model_checkpoint_paths
    ]
    return ckpt


#: A state file lists paths, a few hundred bytes each; anything larger is not one.
MAX_STATE_FILE_BYTES = 4 * 2**20


def _read_state_file(path: str) -> bytes:
    """The state file's bytes, refusing what could hang or exhaust the reader.

    Only a regular file is read (a FIFO planted under its name must not block), and at
    most :data:`MAX_STATE_FILE_BYTES`.
    """
    try:
        return storage_for(path).read_bytes(path, max_bytes=MAX_STATE_FILE_BYTES)
    except ValueError as e:
        raise CheckpointStateParseError(
            f"{e} A checkpoint state file is a short list of paths."
        ) from None


def latest_checkpoint(checkpoint_dir: StrPath, latest_filename: str | None = None) -> str | None:
    """The newest checkpoint's prefix named by the state file, if that checkpoint exists.

    Two differences from TensorFlow, both so that this names what a restoring session
    restores: a state file naming a checkpoint outside ``checkpoint_dir`` (a moved or
    copied run) is read as naming the checkpoint of the same name inside it; and without
    a usable state file (missing, empty, unreadable) the newest committed checkpoint
    found by listing the directory is returned.

    Args:
      checkpoint_dir: the directory holding the state file.
      latest_filename: the state file's name (default ``"checkpoint"``).

    Returns:
      The prefix, to pass to ``Saver.restore``; None when the directory holds no
      checkpoint, or the one the state file names is missing (an ERROR is logged:
      "Couldn't match files for checkpoint ..."). On an object store (``s3://``), where
      the manifests are the commit records and the state file only a hint, a missing
      one is followed by the newest committed checkpoint found by listing.

    Example:
        >>> latest_checkpoint("/tmp/run")  # doctest: +SKIP
        '/tmp/run/model.ckpt-10'
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    try:
        ckpt = get_checkpoint_state(checkpoint_dir, latest_filename)
    except ValueError:  # a state file that names no checkpoint (an empty file)
        ckpt = None
    if ckpt is None:
        # No usable state file: the newest committed checkpoint, as a restore would find.
        found = find_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    if ckpt.model_checkpoint_path:
        path = inside_by_name(ckpt.model_checkpoint_path, checkpoint_dir)
        if path is not None and checkpoint_exists(path):
            return path
        logger.error("Couldn't match files for checkpoint %s", ckpt.model_checkpoint_path)
        if not storage_for(checkpoint_dir).can_rename:
            # On an object store the state file is a hint beside the commit records (the
            # manifests): the newest committed checkpoint is what a restore would find.
            found = find_checkpoints(checkpoint_dir)
            return found[-1] if found else None
    return None


def inside_by_name(path: str, directory: str) -> str | None:
    """``path`` if it lies in ``directory``; else the checkpoint of the same name inside it,
    if there is one (the state file of a moved or copied run names the old place).

    Example:
        >>> inside_by_name("/old/run/model.ckpt-5", "/nonexistent/run") is None
        True
    """
    name = os.path.basename(os.path.normpath(path))
    if name in ("", os.curdir, os.pardir):
        return None  # not the name of a checkpoint: "..", "." or a directory
    if (
        os.path.realpath(os.path.dirname(path) or os.curdir)
        == os.path.realpath(directory or os.curdir)
        and os.path.basename(path) == name
    ):
        return path
    inside = os.path.join(directory, name)
    return inside if checkpoint_exists(inside) else None
