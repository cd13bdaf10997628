"""DTensors as state values: each rank saves its own boxes, restores the boxes it holds.

A ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and optimizer moments, tensor
parallel shards) is recorded in the tree as a torch tensor of its global shape. When
flattened it becomes :class:`LocalBoxes`: the region of the global tensor this rank holds
(``DTensor.__create_chunk_list__``, what torch's own checkpointing uses), its bytes, and
which of the ranks holding the same region (a replicated placement) writes it, so that a
region is written once. ``saving/sharded_write.py`` writes them and records the boxes in
the manifest (``format/boxes.py``).

On restore the target DTensor (the user's model built on the restoring job's mesh) says
which region this rank needs; ``saving/sharded_restore.py`` reads only that region's
overlaps with the saved boxes and hands it here as a :class:`LocalPiece`, which is
copied into the DTensor's local tensor in place. A plain tensor restores from a sharded
checkpoint as the whole tensor (``TorchAdapter``), and a DTensor from a whole tensor as
that tensor's region.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable
from typing import Any, NamedTuple

import numpy as np

from trainhooks.checkpoint.format import dtypes
from trainhooks.checkpoint.format.boxes import Box, copy_overlap
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData
from trainhooks.checkpoint.state.adapters.base import ArraySpec
from trainhooks.checkpoint.state.adapters.torch import TorchAdapter

__all__ = ["DTensorAdapter", "LocalBoxes", "LocalPiece", "is_dtensor", "local_box"]

#: A region larger than this is stored as several boxes along its first dimension, so
#: that a restore onto another mesh reads (and checksums) little beyond what it needs.
SPLIT_BYTES = 16 * 2**20


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a DTensor (without importing torch.distributed)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def local_box(value: Any) -> Box:
    """The region of the global tensor that DTensor ``value``'s local tensor holds, in
    storage coordinates (``dtypes.storage_spec``: complex numbers add a last dimension)."""
    chunks = value.__create_chunk_list__()
    if len(chunks) != 1:
        raise TypeError(f"a DTensor whose local tensor is {len(chunks)} regions is not supported")
    offsets = tuple(int(o) for o in chunks[0].offsets)
    sizes = tuple(int(s) for s in chunks[0].sizes)
    code = dtypes.torch_dtype_code(value.dtype)
    _, storage = dtypes.storage_spec(code, sizes)
    extra = storage[len(sizes) :]
    return Box(offsets + (0,) * len(extra), sizes + extra)


class LocalBoxes:
    """What a DTensor flattens to: the global tensor's stored dtype and shape, the boxes
    this rank holds with their bytes, and this rank's place among the ranks that hold the
    same boxes (``replica`` of ``replicas``; a box is written by one of them)."""

    __slots__ = ("boxes", "dtype", "replica", "replicas", "shape")

    def __init__(
        self,
        dtype: str,
        shape: tuple[int, ...],
        boxes: list[tuple[Box, TensorData]],
        replica: int,
        replicas: int,
    ) -> None:
        self.dtype, self.shape, self.boxes = dtype, shape, boxes
        self.replica, self.replicas = replica, replicas

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's boxes."""
        return sum(data.buffer.nbytes for _, data in self.boxes)


class _RegionSize(NamedTuple):
    nbytes: int


class LocalPiece:
    """A sharded tensor as one rank restores it: the global dtype code and shape (what
    the tree says), this rank's ``region`` of it, the saved boxes that overlap the region
    with their checked bytes (``parts``), and the DTensor they go into.

    It stands where the restore expects a ``TensorData`` (``nbytes`` is the region's
    bytes); :meth:`apply` copies the parts' overlaps into the target's local tensor, in
    place.
    """

    __slots__ = ("dtype", "parts", "region", "shape", "target")

    def __init__(
        self,
        dtype: str,
        shape: tuple[int, ...],
        region: Box,
        parts: list[tuple[Box, memoryview]],
        target: Any,
    ) -> None:
        self.dtype, self.shape, self.region, self.parts = dtype, shape, region, parts
        self.target = target

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's region (not of the global tensor)."""
        return self.region.volume * DTYPE_ITEMSIZE[self.dtype]

    @property
    def buffer(self) -> _RegionSize:
        """What the restore asks of a ``TensorData``'s bytes: only their size (the bytes
        are the parts', put in place by :meth:`apply`)."""
        return _RegionSize(self.nbytes)

    def apply(self) -> Any:
        """Copy the region into the target DTensor's local tensor; returns the target."""
        import torch

        local = self.target.to_local()
        if self.nbytes != local.numel() * local.element_size():
            raise ValueError(
                f"a region of {self.nbytes} bytes does not fit a local tensor of "
                f"{list(local.shape)} {local.dtype}"
            )
        if not self.nbytes:
            return self.target
        itemsize = DTYPE_ITEMSIZE[self.dtype]
        # Straight into the local tensor's memory where it is one contiguous run of
        # plain bytes (FSDP2's shards and moments are): one copy, no buffer to allocate
        # (its page faults cost more than the copy); else through a buffer and copy_.
        direct = local.is_contiguous() and not local.is_conj() and not local.is_neg()
        with torch.no_grad():
            if direct:
                out = local.detach().reshape(-1).view(torch.uint8).numpy()
            else:
                out = np.empty(self.nbytes, np.uint8)
            for box, buffer in self.parts:
                copy_overlap(buffer, box, out, self.region, itemsize)
            if not direct:
                source = torch.from_numpy(out).view(local.dtype).reshape(local.shape)
                local.copy_(source)
        return self.target


class DTensorAdapter(TorchAdapter):
    """:class:`~trainhooks.checkpoint.state.adapters.base.ArrayAdapter` for DTensors.

    Recorded as ``"torch"`` arrays of their global shape, so a reader that knows nothing
    of meshes rebuilds them as whole torch tensors (``build``).
    """

    def owns(self, value: object) -> bool:
        return is_dtensor(value)

    def spec(self, value: Any) -> ArraySpec:
        for placement in value.placements:
            if placement.is_partial():
                raise TypeError(
                    "is a DTensor with a Partial placement (a sum not yet reduced): "
                    "redistribute it to Replicate() or Shard() before saving"
                )
        return super().spec(value)

    def to_tensor_data(self, value: Any, *, copy: bool) -> LocalBoxes:  # type: ignore[override]
        self.spec(value)
        code = dtypes.torch_dtype_code(value.dtype)
        dtype, shape = dtypes.storage_spec(code, tuple(int(n) for n in value.shape))
        box = local_box(value)
        replica, replicas = _replica_of(value)
        boxes: list[tuple[Box, TensorData]] = []
        if box.volume:
            data = dtypes.torch_to_tensor_data(value.to_local(), copy=copy)
            boxes = _split(box, data)
        return LocalBoxes(dtype, shape, boxes, replica, replicas)

    def identity(self, value: Any) -> Hashable | None:
        return None  # tied DTensors are saved under each name; a restore fills both alike

    def writable_problem(self, value: Any) -> str | None:
        return super().writable_problem(value.to_local())

    def restore(self, target: Any, data: TensorData, spec: ArraySpec) -> Any:
        if isinstance(data, LocalPiece):
            return data.apply()
        return _piece_of_whole(target, data).apply()

    def host_view(self, target: Any) -> np.ndarray[Any, Any] | None:
        return None

    def build(self, data: TensorData, spec: ArraySpec) -> Any:
        if isinstance(data, LocalPiece):
            return data.apply()
        return super().build(data, spec)


def _replica_of(value: Any) -> tuple[int, int]:
    """This rank's index among the ranks of the mesh that hold the same region, and
    how many they are: the mesh dimensions on which the placement is ``Replicate``."""
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return 0, 1
    index, count = 0, 1
    for dim, placement in enumerate(value.placements):
        if placement.is_replicate():
            index = index * mesh.size(dim) + coordinate[dim]
            count *= mesh.size(dim)
    return index, count


def _split(box: Box, data: TensorData) -> list[tuple[Box, TensorData]]:
    """``box`` as boxes of at most about ``SPLIT_BYTES`` along its first dimension."""
    rows = box.sizes[0] if box.sizes else 1
    if data.buffer.nbytes <= SPLIT_BYTES or rows <= 1:
        return [(box, data)]
    row_bytes = data.buffer.nbytes // rows
    step = max(1, SPLIT_BYTES // row_bytes)
    pieces = []
    for start in range(0, rows, step):
        n = min(step, rows - start)
        sub = Box((box.offsets[0] + start, *box.offsets[1:]), (n, *box.sizes[1:]))
        buffer = data.buffer[start * row_bytes : (start + n) * row_bytes]
        pieces.append((sub, TensorData(data.dtype, sub.sizes, buffer)))
    return pieces


def _piece_of_whole(target: Any, data: TensorData) -> LocalPiece:
    """The target's region of the whole tensor ``data`` (global shape)."""
    whole = Box((0,) * len(data.shape), tuple(data.shape))
    return LocalPiece(
        data.dtype, tuple(data.shape), local_box(target), [(whole, data.buffer)], target
    )
