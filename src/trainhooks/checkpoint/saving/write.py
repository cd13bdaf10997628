"""Writing a checkpoint: the data files (any number of writers), then one commit.

:func:`write_checkpoint` checks the flattened state and plans the data files; then, in
the process group of the save (``distributed/group.py``; a group of one by default):

1. the coordinator opens the staging place (``storage/commit.py``) and tells every rank;
2. every rank writes its share of the data files (:func:`write_data_files`, in parallel,
   each fsynced) and reports what it wrote: names, sizes, tensors and checksums;
3. the coordinator merges the reports into one manifest and commits it
   (:func:`commit_checkpoint`): the checkpoint appears at its prefix complete, or not at
   all. If any rank failed, nothing is committed and every rank raises.

A one-process save is the same path with one writer.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import xxhash

from trainhooks._clock import Clock, wall_clock
from trainhooks.checkpoint.distributed.group import SINGLE_PROCESS, ProcessGroup
from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.datafile import (
    DEFAULT_MAX_FILE_BYTES,
    data_file_name,
    write_data_file,
)
from trainhooks.checkpoint.format.flat_check import FlatStateLike, check_flat
from trainhooks.checkpoint.format.manifest import (
    Chunk,
    FileEntry,
    Manifest,
    encode_json,
    encode_manifest,
)
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.saving.layout import Layout, SaveCache, plan_layout
from trainhooks.checkpoint.saving.sharded_write import (
    BoxReport,
    merge_boxes,
    split_sharded,
    write_shards,
)
from trainhooks.checkpoint.state.adapters.dtensor import LocalBoxes
from trainhooks.checkpoint.storage import Storage, storage_for
from trainhooks.checkpoint.storage.commit import (
    MANIFEST_NAME,
    Staging,
    abort_staging,
    begin_staging,
    commit_staging,
    holds_only_checkpoint_files,
)
from trainhooks.errors import NotFoundError

__all__ = ["commit_checkpoint", "write_checkpoint", "write_data_files"]

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
    group: ProcessGroup = SINGLE_PROCESS,
    cache: SaveCache | None = None,
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
      group: the processes that write this checkpoint together (every rank calls this
        with the same arguments); data file ``i`` is written by rank ``i % world_size``.
      cache: the saver's memory of its last save (``layout.py``): a state of the same
        tensor names, dtypes and shapes reuses its plan, headers and manifest columns.

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
    storage = storage_for(prefix) if storage is None else storage
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    with paused_gc():
        plain, sharded = split_sharded(flat.tensors)
        columns = TensorColumns.from_mapping(plain)
        layout = None if cache is None else cache.layout(columns, max_shard_bytes, group.world_size)
        checked = layout is not None  # the same names as a save checked before
        tensors = check_flat(_Flat(columns, flat.tree), global_step, names_checked=checked)
        user_metadata = dict(metadata or {})
        encode_json(user_metadata, "metadata")  # fail before writing anything
        texts = None if cache is None else cache.tree_texts()
        tree_json = encode_json(flat.tree, "the state tree", texts)
    if layout is None:
        with paused_gc():
            layout = plan_layout(columns, tensors, max_shard_bytes, group.world_size)
        if cache is not None:
            cache.keep(layout)
    sizes, groups = layout.sizes, layout.groups
    heads = None if cache is None else cache.manifest_heads
    if group.world_size == 1:
        _check_target(storage, prefix)
    try:
        if group.world_size == 1:
            staging = begin_staging(storage, prefix)
            try:
                files = write_data_files(
                    storage, staging, tensors, layout, range(len(groups)), num_threads
                )
                table = {}
                if sharded:
                    shard_files, boxes = write_shards(storage, staging, sharded, 0, 1)
                    files.update(shard_files)
                    table = merge_boxes(sharded, [boxes])
            except BaseException:
                abort_staging(storage, staging)
                raise
            manifest = Manifest(global_step, clock(), flat.tree, user_metadata, files, {}, table)
            commit_checkpoint(storage, staging, manifest, tree_json, heads)
        else:
            _write_in_group(
                group,
                storage,
                prefix,
                tensors,
                layout,
                num_threads,
                tree_json,
                lambda files, table: Manifest(
                    global_step, clock(), flat.tree, user_metadata, files, {}, table
                ),
                sharded,
                _what_is_saved(prefix, global_step, tree_json, sizes, groups),
            )
    except OSError as e:
        where = f" at {e.filename}" if e.filename else ""
        message = f"{e.strerror or e}: saving checkpoint {prefix} failed{where}"
        args = (message,) if e.errno is None else (e.errno, message)
        try:  # the same class (ENOSPC, PreconditionFailed, ...), a message naming the checkpoint
            raise type(e)(*args) from e
        except TypeError:
            raise OSError(*args) from e


class _Flat(NamedTuple):
    """The replicated part of a flattened state (its sharded tensors taken out)."""

    tensors: Mapping[str, Any]
    tree: Any


def _check_target(storage: Storage, prefix: str) -> None:
    parent = os.path.dirname(prefix) or os.curdir
    if not storage.is_dir(parent):
        raise NotFoundError(f"Parent directory of {prefix} doesn't exist, can't save.")
    if (
        storage.exists(prefix)
        and storage.version(os.path.join(prefix, MANIFEST_NAME)) is None
        and not holds_only_checkpoint_files(storage, prefix)
    ):
        raise FileExistsError(
            f"{prefix} exists and is not a trainhooks checkpoint directory; "
            "remove it or save under another path"
        )


def _write_in_group(
    group: ProcessGroup,
    storage: Storage,
    prefix: str,
    tensors: TensorColumns,
    layout: Layout,
    num_threads: int | None,
    tree_json: str,
    make_manifest: Any,
    sharded: dict[str, LocalBoxes],
    saving: dict[str, Any],
) -> None:
    """Every rank writes data files ``i % world_size == rank``; rank 0 alone checks the
    target, opens the staging place and commits. Every step's outcome reaches every rank,
    so no rank waits for one that already failed: all of them raise the same error.

    ``saving`` (:func:`_what_is_saved`) must be the coordinator's on every rank: a rank
    saving another step, or a state of other entries, shapes or dtypes, would otherwise
    pair its save with the coordinator's and put its data files into that checkpoint.
    """
    begun: Any = None
    if group.rank == 0:
        try:
            _check_target(storage, prefix)
            begun = {"staging": list(begin_staging(storage, prefix)), "saving": saving}
        except Exception as e:
            begun = {"error": f"rank 0: {type(e).__name__}: {e}"}
    begun = group.broadcast(begun)
    if "error" in begun:
        raise OSError(f"could not start the save: {begun['error']}")
    staging = Staging(*begun["staging"])
    mine = range(group.rank, len(layout.groups), group.world_size)
    theirs = begun["saving"]
    try:
        if theirs != saving:
            raise ValueError(
                f"it saves step {saving['step']} as {saving['prefix']} while rank 0 saves "
                f"step {theirs['step']} as {theirs['prefix']}"
                + (
                    ", a state of other entries, shapes or dtypes"
                    if theirs["plan"] != saving["plan"]
                    else ""
                )
                + ": every rank must save at the same step the same state"
            )
        written = write_data_files(storage, staging, tensors, layout, mine, num_threads)
        boxes: BoxReport = {}
        if sharded:  # this rank's own boxes, in a file of its own
            shard_files, boxes = write_shards(
                storage, staging, sharded, group.rank, group.world_size
            )
            written.update(shard_files)
        report: Any = {**_files_to_json(written), "boxes": boxes}
    except Exception as e:  # reported to the coordinator, raised below on every rank
        report = {"error": f"rank {group.rank}: {type(e).__name__}: {e}"}
    reports = group.gather(report)
    outcome = None
    if reports is not None:
        failed = [r["error"] for r in reports if "error" in r]
        if failed:
            abort_staging(storage, staging)
            outcome = "; ".join(failed)
        else:
            files = {k: v for r in reports for k, v in _files_from_json(r).items()}
            try:
                table = merge_boxes(sharded, [r["boxes"] for r in reports])
            except ValueError as e:
                abort_staging(storage, staging)
                outcome = f"rank 0: {e}"
            else:
                try:
                    commit_checkpoint(storage, staging, make_manifest(files, table), tree_json)
                except Exception as e:  # the commit removed what was staged
                    outcome = f"rank 0: the commit failed: {type(e).__name__}: {e}"
    outcome = group.broadcast(outcome)
    if outcome is not None:
        raise OSError(f"a writer failed: {outcome}")


def _what_is_saved(
    prefix: str, step: int, tree_json: str, sizes: list[int], groups: list[Sequence[int]]
) -> dict[str, Any]:
    """What one rank's save is: the checkpoint, the step and a digest of the plan."""
    digest = xxhash.xxh3_128(tree_json.encode())
    digest.update(json.dumps([sizes, [list(g) for g in groups]]).encode())
    return {"prefix": prefix, "step": int(step), "plan": digest.hexdigest()}


def write_data_files(
    storage: Storage,
    staging: Staging,
    tensors: TensorColumns,
    layout: Layout,
    which: Sequence[int],
    num_threads: int | None = None,
) -> dict[str, FileEntry]:
    """Write data files ``which`` of ``layout`` (in parallel, each fsynced).

    Returns what was written, by the name the manifest lists each file under.
    """
    count = len(layout.groups)
    names = [data_file_name(i, count) for i in which]
    threads = num_threads or min(len(names), os.cpu_count() or 1)
    jobs = [
        (storage, staging.path(n), tensors, layout.groups[i], layout.sizes, layout.file(i, tensors))
        for n, i in zip(names, which)
    ]
    if threads <= 1 or len(jobs) <= 1:
        results = [write_data_file(*job) for job in jobs]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="trainhooks-write") as pool:
            futures = [pool.submit(write_data_file, *job) for job in jobs]
            results = [fut.result() for fut in futures]
    return {staging.name(n): r for n, r in zip(names, results)}


def commit_checkpoint(
    storage: Storage,
    staging: Staging,
    manifest: Manifest,
    tree_json: str | None = None,
    heads: dict[int, tuple[FileEntry, bytes]] | None = None,
) -> None:
    """Encode ``manifest`` (every data file of the save) and commit the staged checkpoint;
    ``heads`` is ``encode_manifest``'s memo of the files' entries, if there is one."""
    with paused_gc():
        encoded = encode_manifest(manifest, tree_json, heads)
    commit_staging(storage, staging, encoded)


def _files_to_json(files: dict[str, FileEntry]) -> Any:
    """What one writer wrote, as a JSON value for the coordinator (a group of one passes
    the entries through untouched)."""
    return {"files": files}


def _files_from_json(report: Any) -> dict[str, FileEntry]:
    files = report["files"]
    return {
        name: entry
        if isinstance(entry, FileEntry)
        else FileEntry(
            entry[0],
            entry[1],
            tuple(entry[2]),
            tuple(entry[3]),
            tuple(tuple(s) for s in entry[4]),
            tuple(Chunk(*c) for c in entry[5]),
        )
        for name, entry in files.items()
    }
