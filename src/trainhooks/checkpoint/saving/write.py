"""Writing a checkpoint: the data files, then the manifest, then the commit.

:func:`write_checkpoint` checks the flattened state, plans the data files, writes them
(in parallel, each fsynced) and the manifest into a staging directory, then publishes
it (``storage/commit.py``): the checkpoint appears at its prefix complete, or not at all.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainhooks._clock import Clock, wall_clock
from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.datafile import (
    DEFAULT_MAX_FILE_BYTES,
    data_file_name,
    plan_files,
    write_data_file,
)
from trainhooks.checkpoint.format.flat_check import FlatStateLike, check_flat
from trainhooks.checkpoint.format.manifest import (
    FileEntry,
    Manifest,
    encode_json,
    encode_manifest,
)
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.storage import LocalStorage, Storage
from trainhooks.checkpoint.storage.commit import (
    MANIFEST_NAME,
    publish,
    remove_quietly,
    staging_path,
)
from trainhooks.errors import NotFoundError

__all__ = ["write_checkpoint"]

logger = logging.getLogger(__name__)


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
        >>> from trainhooks.checkpoint.format.tensor import TensorData
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
    parent = os.path.dirname(prefix) or os.curdir
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
    tmp = staging_path(prefix)
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
        remove_quietly(storage, tmp)
        raise
    publish(storage, tmp, prefix)


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
