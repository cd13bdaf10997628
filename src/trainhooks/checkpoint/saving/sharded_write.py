"""Writing sharded tensors: each rank its own boxes, one file per rank, one manifest.

``write.py`` hands the tensors of a flattened state here first: DTensors flattened to
``adapters.dtensor.LocalBoxes`` are taken out of the plan that every rank computes
alike from replicated values (:func:`split_sharded`); each rank writes the boxes it holds
into a data file of its own, ``shards-<rank>-of-<world>.safetensors``
(:func:`write_shards`); a box that several ranks hold (a replicated placement) is written
by one of them, a different one for each tensor. The coordinator merges every rank's
boxes into the manifest's ``sharded`` field (:func:`merge_boxes`) and refuses to commit a
tensor whose boxes do not cover it (a DTensor saved by a ``Saver`` outside its job's
process group).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from trainhooks.checkpoint.format.boxes import Box, ShardedEntry, box_tensor_name
from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.datafile import write_data_file
from trainhooks.checkpoint.format.manifest import FileEntry
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state.adapters.dtensor import LocalBoxes
from trainhooks.checkpoint.storage import Storage
from trainhooks.checkpoint.storage.commit import Staging

__all__ = ["BoxReport", "merge_boxes", "shard_file_name", "split_sharded", "write_shards"]

#: What one rank wrote of each sharded tensor: name -> [[offsets, sizes], ...] (JSON).
BoxReport = dict[str, list[list[list[int]]]]


def shard_file_name(rank: int, world_size: int) -> str:
    """``shards-00001-of-00002.safetensors``: the boxes rank 1 of 2 wrote."""
    return f"shards-{rank:05d}-of-{world_size:05d}.safetensors"


def split_sharded(
    tensors: Mapping[str, Any],
) -> tuple[Mapping[str, TensorData], dict[str, LocalBoxes]]:
    """The tensors written by the replicated plan, and the sharded ones by name."""
    if isinstance(tensors, TensorColumns):
        sources = tensors.sources
        if LocalBoxes not in set(map(type, sources)):  # in C: 100k sources in ~3 ms
            return tensors, {}
        keep = [i for i, s in enumerate(sources) if type(s) is not LocalBoxes]
        plain = TensorColumns(
            [tensors.names[i] for i in keep],
            [tensors.codes[i] for i in keep],
            [tensors.shapes[i] for i in keep],
            [sources[i] for i in keep],
        )
        pairs: list[tuple[str, Any]] = list(zip(tensors.names, sources))
        return plain, {n: s for n, s in pairs if type(s) is LocalBoxes}
    sharded = {n: t for n, t in tensors.items() if type(t) is LocalBoxes}
    if not sharded:
        return tensors, {}
    return {n: t for n, t in tensors.items() if n not in sharded}, sharded


def _mine(sharded: dict[str, LocalBoxes]) -> list[tuple[str, Box, TensorData]]:
    """The boxes this rank writes: all it holds, except the regions that another of the
    ranks holding them writes (the ``k``-th sharded tensor's by replica ``k % replicas``)."""
    mine: list[tuple[str, Box, TensorData]] = []
    for k, (name, local) in enumerate(sharded.items()):
        if k % local.replicas == local.replica:
            mine.extend((name, box, data) for box, data in local.boxes)
    return mine


def write_shards(
    storage: Storage, staging: Staging, sharded: dict[str, LocalBoxes], rank: int, world_size: int
) -> tuple[dict[str, FileEntry], BoxReport]:
    """Write this rank's boxes into its own data file (fsynced); what it wrote.

    Returns the file's manifest entry by name (none when the rank writes no box) and the
    boxes written per tensor.
    """
    mine = _mine(sharded)
    report: BoxReport = {}
    for name, box, _ in mine:
        report.setdefault(name, []).append([list(box.offsets), list(box.sizes)])
    if not mine:
        return {}, report
    columns = TensorColumns(
        [box_tensor_name(name, box) for name, box, _ in mine],
        [data.dtype for _, _, data in mine],
        [tuple(data.shape) for _, _, data in mine],
        [data for _, _, data in mine],
    )
    sizes = [data.buffer.nbytes for _, _, data in mine]
    # largest item size first keeps every box aligned, as the plan of data files does
    order = sorted(range(len(mine)), key=lambda i: -_itemsize(columns.codes[i]))
    file = shard_file_name(rank, world_size)
    entry = write_data_file(storage, staging.path(file), columns, order, sizes)
    return {staging.name(file): entry}, report


def _itemsize(code: str) -> int:
    from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE

    return DTYPE_ITEMSIZE[code]


def merge_boxes(
    sharded: dict[str, LocalBoxes], reports: list[BoxReport]
) -> dict[str, ShardedEntry]:
    """Every rank's boxes as the manifest's ``sharded`` entries (``sharded``: the
    coordinator's own, for each tensor's global dtype and shape).

    Raises:
      ValueError: a tensor's boxes do not hold every element of it: some rank of the
        DTensor's mesh did not take part in the save.
    """
    merged: dict[str, ShardedEntry] = {}
    for name, local in sharded.items():
        boxes = sorted(
            {Box(tuple(o), tuple(s)) for report in reports for o, s in report.get(name, [])}
        )
        held = sum(b.volume for b in boxes)
        if held != math.prod(local.shape):
            raise ValueError(
                f"DTensor {name!r} of shape {list(local.shape)}: the processes of this save "
                f"hold {held} of its {math.prod(local.shape)} elements. Every rank of its "
                "mesh must save together: pass Saver(process_group=TorchProcessGroup()) "
                "on every rank (a MonitoredTrainingSession in a job does)."
            )
        merged[name] = ShardedEntry(local.dtype, local.shape, tuple(boxes))
    return merged
