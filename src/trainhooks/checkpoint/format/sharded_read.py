"""Reading a region of a tensor, whole or sharded, from an opened checkpoint.

:func:`read_region` copies the elements of one region (the box a rank of the restoring
job holds, or the whole tensor) out of the saved boxes that overlap it. Only those boxes
are read, each checksummed first (``MappedCheckpoint.tensor_data``), so a rank restoring
its shard reads about its share of the checkpoint, whatever mesh saved it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from trainhooks.checkpoint.format.boxes import Box, copy_overlap, intersect, saved_boxes
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData
from trainhooks.errors import DataLossError, NotFoundError

if TYPE_CHECKING:
    from trainhooks.checkpoint.format.mapped_checkpoint import MappedCheckpoint

__all__ = ["read_region", "region_parts", "stored_spec"]


def stored_spec(ckpt: MappedCheckpoint, name: str) -> tuple[str, tuple[int, ...]] | None:
    """The stored dtype code and global shape of tensor ``name``, whole or sharded; None
    when the checkpoint holds no such tensor."""
    found = saved_boxes(name, ckpt.manifest.sharded, ckpt.manifest.tensors)
    return None if found is None else (found[0], found[1])


def read_region(ckpt: MappedCheckpoint, name: str, region: Box | None = None) -> TensorData:
    """The elements of ``region`` (default: all) of tensor ``name``, as new bytes.

    Raises:
      NotFoundError: the checkpoint holds no tensor ``name``.
      ValueError: ``region`` lies outside the tensor.
      DataLossError: a box read fails its checksum.

    Example:
        >>> with open_checkpoint("ckpt/model.ckpt-200") as ckpt:  # doctest: +SKIP
        ...     rows = read_region(ckpt, "model/fc.weight", Box((0, 0), (2, 8)))
    """
    dtype, region, parts = region_parts(ckpt, name, region)
    itemsize = DTYPE_ITEMSIZE[dtype]
    out: np.ndarray[Any, Any] = np.empty(region.volume * itemsize, np.uint8)
    for box, buffer in parts:
        copy_overlap(buffer, box, out, region, itemsize)
    return TensorData(dtype, region.sizes, out.data)


def region_parts(
    ckpt: MappedCheckpoint, name: str, region: Box | None = None
) -> tuple[str, Box, list[tuple[Box, memoryview]]]:
    """The saved boxes of tensor ``name`` that overlap ``region`` (default: all), each
    with its checked bytes in the mapping (valid while ``ckpt`` is open): the stored
    dtype code, the region, and ``(box, bytes)`` for each. Their overlaps with the region
    cover it exactly (``boxes.copy_overlap`` copies each into place).

    Raises:
      NotFoundError: the checkpoint holds no tensor ``name``.
      ValueError: ``region`` lies outside the tensor.
      DataLossError: a box read fails its checksum, or the boxes leave part of the
        region uncovered.
    """
    found = saved_boxes(name, ckpt.manifest.sharded, ckpt.manifest.tensors)
    if found is None:
        ckpt.entry(name)  # raises NotFoundError naming close matches
        raise NotFoundError(f"Key {name} not found in checkpoint {ckpt.prefix}.")
    dtype, shape, boxes = found
    if region is None:
        region = Box((0,) * len(shape), shape)
    if len(region.offsets) != len(shape) or any(
        o < 0 or n < 0 or o + n > d for o, n, d in zip(region.offsets, region.sizes, shape)
    ):
        raise ValueError(f"region {list(region)} lies outside tensor {name!r} of shape {shape}")
    parts: list[tuple[Box, memoryview]] = []
    covered = 0
    for box, stored in boxes:
        part = intersect(box, region)
        if part is None:
            continue
        covered += part.volume
        parts.append((box, ckpt.tensor_data(stored).buffer))
    if covered != region.volume:  # the manifest's boxes cover every element: checked on opening
        raise DataLossError(
            f"Checkpoint {ckpt.prefix}: the boxes of {name!r} hold {covered} of the "
            f"{region.volume} elements of {list(region)}"
        )
    return dtype, region, parts
