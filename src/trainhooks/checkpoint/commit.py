"""The commit protocol: a checkpoint directory appears at its prefix complete, or not at all.

A save writes into ``<prefix>.tmp-<random>/``: every data file (in parallel, each
fsynced), then ``manifest.json`` (fsynced), then fsyncs that directory. It then
publishes the directory at ``<prefix>`` and fsyncs the parent:

* ``<prefix>`` absent: one ``rename``.
* ``<prefix>`` present (TF re-saves the step it restored): an atomic exchange of the
  two directories (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old
  checkpoint sits at the temporary name and is deleted. ``<prefix>`` names a
  complete checkpoint at every instant.
* Where the store cannot exchange, the old directory is first renamed to
  ``<prefix>.old-<random>``, then the new one into place. For that instant
  ``<prefix>`` is missing; after a crash there, :func:`remove_leftovers` renames the
  old checkpoint back.

A crash at any point leaves at most ``*.tmp-*`` / ``*.old-*`` entries next to the
checkpoints, which :func:`remove_leftovers` deletes on the next start.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainhooks._clock import Clock, wall_clock
from trainhooks.checkpoint.columns import TensorColumns
from trainhooks.checkpoint.datafile import (
    DEFAULT_MAX_FILE_BYTES,
    data_file_name,
    plan_files,
    write_data_file,
)
from trainhooks.checkpoint.flat_check import FlatStateLike, check_flat
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    encode_json,
    encode_manifest,
)
from trainhooks.checkpoint.storage import LocalStorage, Storage
from trainhooks.errors import NotFoundError

__all__ = [
    "delete_checkpoint",
    "is_checkpoint",
    "remove_leftovers",
    "write_checkpoint",
]

logger = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"(?P<prefix>.+)\.(?P<kind>tmp|old)-[0-9a-f]{12}")
_CHECKPOINT_ENTRY = re.compile(r"manifest\.json|data-\d{5,}-of-\d{5,}\.safetensors")


def _sibling(prefix: str, kind: str) -> str:
    return f"{prefix}.{kind}-{secrets.token_hex(6)}"


def _parent(prefix: str) -> str:
    return os.path.dirname(prefix) or os.curdir


def is_checkpoint(prefix: str | os.PathLike[str]) -> bool:
    """True if ``prefix`` is a committed checkpoint directory (it has a manifest).

    A temporary directory of a save in progress never counts, even once its manifest
    is written. This does not verify contents; :func:`~trainhooks.checkpoint.format.open_checkpoint` does.

    Example:
        >>> is_checkpoint("/nonexistent/model.ckpt-10")
        False
    """
    prefix = os.fspath(prefix)
    if _LEFTOVER.fullmatch(os.path.basename(prefix.rstrip("/"))):
        return False
    return (
        os.path.isdir(prefix)
        and not os.path.islink(prefix)
        and os.path.isfile(os.path.join(prefix, MANIFEST_NAME))
    )


def write_checkpoint(
    prefix: str | os.PathLike[str],
    flat: FlatStateLike,
    *,
    global_step: int,
    metadata: Mapping[str, Any] | None = None,
    storage: Storage | None = None,
    max_shard_bytes: int = DEFAULT_MAX_FILE_BYTES,
    num_threads: int | None = None,
    clock: Clock = wall_clock,
) -> None:
    """Write ``flat`` as a checkpoint directory at ``prefix`` and return once it is durable.

    Runs the commit protocol of this module; an existing checkpoint at ``prefix`` is
    replaced atomically. The state file is not touched (``Saver`` does that next).

    Args:
      prefix: the checkpoint path, e.g. ``"ckpt/model.ckpt-200"``; its parent must exist.
      flat: ``tree.FlatState``: ``tensors`` (name -> TensorData) and ``tree`` (JSON).
      global_step: stored in the manifest and as the 0-d I64 tensor ``"global_step"``.
      metadata: JSON-serialisable user metadata, kept in the manifest.
      storage: where to write (default: the local disk).
      max_shard_bytes: target size of one data file; larger states use several.
      num_threads: threads writing data files in parallel (default: one per file, at
        most the CPU count).
      clock: the time source for the manifest's wall time.

    Raises:
      NotFoundError: the parent directory of ``prefix`` does not exist.
      FileExistsError: ``prefix`` exists and is not a checkpoint directory.
      ValueError, TypeError: a tensor, the tree or the metadata cannot be stored.

    Example:
        >>> import numpy as np, collections
        >>> from trainhooks.checkpoint.tensor import TensorData
        >>> Flat = collections.namedtuple("Flat", "tensors tree")
        >>> w = np.arange(4, dtype=np.float32)
        >>> flat = Flat({"w": TensorData("F32", (4,), memoryview(w).cast("B"))}, {"w": "w"})
        >>> write_checkpoint("/tmp/model.ckpt-1", flat, global_step=1)  # doctest: +SKIP
    """
    prefix = os.fspath(prefix).rstrip("/")
    storage = LocalStorage() if storage is None else storage
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    with paused_gc():
        tensors = check_flat(flat, global_step)
        user_metadata = dict(metadata or {})
        encode_json(user_metadata, "metadata")  # fail before writing anything
        tree_json = encode_json(flat.tree, "the state tree")
    parent = _parent(prefix)
    if not storage.is_dir(parent):
        raise NotFoundError(f"Parent directory of {prefix} doesn't exist, can't save.")
    if storage.exists(prefix) and not storage.exists(os.path.join(prefix, MANIFEST_NAME)):
        raise FileExistsError(
            f"{prefix} exists and is not a trainhooks checkpoint directory; "
            "remove it or save under another path"
        )

    with paused_gc():
        sizes = tensors.nbytes()
        groups = plan_files(tensors, sizes, max_shard_bytes)
    tmp = _sibling(prefix, "tmp")
    try:
        _save(
            storage,
            prefix,
            tmp,
            tensors,
            sizes,
            groups,
            num_threads,
            global_step,
            clock,
            flat.tree,
            tree_json,
            user_metadata,
        )
    except OSError as e:
        where = f" at {e.filename}" if e.filename else ""
        raise OSError(
            e.errno, f"{e.strerror or e}: saving checkpoint {prefix} failed{where}"
        ) from e


def _save(
    storage: Storage,
    prefix: str,
    tmp: str,
    tensors: TensorColumns,
    sizes: list[int],
    groups: list[Sequence[int]],
    num_threads: int | None,
    global_step: int,
    clock: Clock,
    tree: Any,
    tree_json: str,
    user_metadata: dict[str, Any],
) -> None:
    storage.mkdir(tmp)
    try:
        files = _write_files(storage, tmp, tensors, sizes, groups, num_threads)
        manifest = Manifest(global_step, clock(), tree, user_metadata, files, {})
        with paused_gc():
            encoded = encode_manifest(manifest, tree_json)
        f = storage.create(os.path.join(tmp, MANIFEST_NAME))
        try:
            f.write(encoded)
            f.fsync()
        finally:
            f.close()
        storage.fsync_dir(tmp)
    except BaseException:
        _remove_quietly(storage, tmp)
        raise
    _publish(storage, tmp, prefix)


def _write_files(
    storage: Storage,
    tmp: str,
    tensors: TensorColumns,
    sizes: list[int],
    groups: list[Sequence[int]],
    num_threads: int | None,
) -> dict[str, FileEntry]:
    names = [data_file_name(i, len(groups)) for i in range(len(groups))]
    threads = num_threads or min(len(groups), os.cpu_count() or 1)
    jobs = [(storage, os.path.join(tmp, n), tensors, g, sizes) for n, g in zip(names, groups)]
    if threads <= 1 or len(groups) == 1:
        results = [write_data_file(*job) for job in jobs]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="trainhooks-write") as pool:
            futures = [pool.submit(write_data_file, *job) for job in jobs]
            results = [fut.result() for fut in futures]
    return dict(zip(names, results))


def _publish(storage: Storage, tmp: str, prefix: str) -> None:
    parent = _parent(prefix)
    if not storage.exists(prefix):
        try:
            storage.rename(tmp, prefix)
        except FileExistsError:
            pass  # another save published the same prefix meanwhile: swap below
        else:
            storage.fsync_dir(parent)
            return
    if storage.exchange(tmp, prefix):
        storage.fsync_dir(parent)
        _remove_quietly(storage, tmp)  # now the previous checkpoint
        return
    old = _sibling(prefix, "old")
    storage.rename(prefix, old)
    try:
        storage.rename(tmp, prefix)
    except BaseException:
        storage.rename(old, prefix)  # put the previous checkpoint back before failing
        _remove_quietly(storage, tmp)
        raise
    storage.fsync_dir(parent)
    _remove_quietly(storage, old)


def _remove_quietly(storage: Storage, path: str) -> None:
    try:
        storage.remove_tree(path)
    except OSError as e:
        logger.warning("Could not remove %s (%s); it will be removed on the next start.", path, e)


def remove_leftovers(
    directory: str | os.PathLike[str], *, storage: Storage | None = None
) -> list[str]:
    """Delete what interrupted saves left in ``directory``; returns the paths removed.

    Removes ``<prefix>.tmp-*`` (saves that never committed, or a replaced checkpoint
    not yet deleted) and ``<prefix>.old-*`` entries. If a crash hit the fallback swap
    between its two renames, so that ``<prefix>`` is missing, the old checkpoint is
    renamed back to ``<prefix>`` instead of being removed.

    Call it only while no other process saves into ``directory``: it cannot tell a
    crashed save from one in progress.

    Example:
        >>> remove_leftovers("/tmp/run")  # doctest: +SKIP
        ['/tmp/run/model.ckpt-200.tmp-5f1c0e6a9b2d']
    """
    directory = os.fspath(directory)
    storage = LocalStorage() if storage is None else storage
    removed: list[str] = []
    for name in sorted(storage.list_dir(directory)):
        match = _LEFTOVER.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(directory, name)
        prefix = os.path.join(directory, match["prefix"])
        if (
            match["kind"] == "old"
            and not storage.exists(prefix)
            and storage.exists(os.path.join(path, MANIFEST_NAME))
        ):
            logger.warning("Restoring %s from %s, left by an interrupted save.", prefix, path)
            storage.rename(path, prefix)
            continue
        storage.remove_tree(path)
        removed.append(path)
    if removed:
        storage.fsync_dir(directory)
        logger.info("Removed %d leftovers of interrupted saves in %s.", len(removed), directory)
    return removed


def delete_checkpoint(prefix: str | os.PathLike[str], *, storage: Storage | None = None) -> None:
    """Delete the checkpoint directory at ``prefix``; a missing one is not an error.

    The directory is first renamed to a temporary name, so that a crash mid-way
    never leaves a half-deleted directory that looks like a checkpoint.

    Raises:
      ValueError: ``prefix`` holds files that a checkpoint does not have; nothing is deleted.

    Example:
        >>> delete_checkpoint("/tmp/run/model.ckpt-100")  # doctest: +SKIP
    """
    prefix = os.fspath(prefix).rstrip("/")
    storage = LocalStorage() if storage is None else storage
    if not storage.exists(prefix):
        return
    if not storage.is_dir(prefix):
        raise ValueError(f"{prefix} is not a checkpoint directory; not deleting it")
    foreign = [n for n in storage.list_dir(prefix) if not _CHECKPOINT_ENTRY.fullmatch(n)]
    if foreign:
        raise ValueError(
            f"{prefix} holds files that are not part of a checkpoint ({sorted(foreign)[:5]}); "
            "not deleting it"
        )
    doomed = _sibling(prefix, "tmp")
    try:
        storage.rename(prefix, doomed)
    except FileNotFoundError:
        return  # deleted concurrently
    storage.fsync_dir(_parent(prefix))
    storage.remove_tree(doomed)
