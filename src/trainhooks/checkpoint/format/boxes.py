"""Sharded tensors: a tensor stored as boxes of its global index space, and the manifest's
``sharded`` field that says how to put them together.

A DTensor (an FSDP2 parameter, an optimizer moment, a tensor-parallel shard) is saved as
the boxes its ranks hold: each box is a region ``offsets`` .. ``offsets + sizes`` of the
global tensor and is stored as an ordinary tensor of a data file, named after the region
in slice notation, ``model/fc.weight[0:3,0:8]`` (:func:`box_tensor_name`), so that any
safetensors reader sees what it is. The manifest records, per sharded tensor::

    "sharded": {"model/fc.weight": {"dtype": "F32", "shape": [6, 8],
                                     "boxes": [[[0, 0], [3, 8]], [[3, 0], [3, 8]]]}}

``dtype`` and ``shape`` are the global tensor's as stored (the storage code and shape of
``dtypes.storage_spec``); each box is ``[offsets, sizes]``. The boxes cover the global
tensor exactly once: :func:`decode_sharded` refuses boxes out of bounds, overlapping,
missing from the data files or not covering every element, before anything is allocated.
A whole tensor is the case of one box, so readers treat every tensor alike
(:func:`saved_boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from trainhooks.checkpoint.format.manifest import TensorEntry
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE

__all__ = [
    "MAX_BOXES",
    "Box",
    "ShardedEntry",
    "box_tensor_name",
    "copy_overlap",
    "decode_sharded",
    "encode_sharded",
    "intersect",
    "logical_tensors",
    "saved_boxes",
]

#: More boxes for one tensor than any mesh makes: a manifest with more is refused unread.
MAX_BOXES = 1 << 20
_MAX_NDIM = 64
_MAX_DIM = 2**63 - 1


class Box(NamedTuple):
    """A region of a tensor's global index space: ``offsets`` and ``sizes`` per dimension.

    Example:
        >>> Box((3, 0), (3, 8)).volume
        24
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def volume(self) -> int:
        """How many elements the box holds."""
        return math.prod(self.sizes)


class ShardedEntry(NamedTuple):
    """One sharded tensor of a manifest: its stored dtype code, global shape and boxes."""

    dtype: str
    shape: tuple[int, ...]
    boxes: tuple[Box, ...]


def box_tensor_name(name: str, box: Box) -> str:
    """The data-file tensor name of ``box`` of tensor ``name``: the region as a slice.

    Example:
        >>> box_tensor_name("model/fc.weight", Box((3, 0), (3, 8)))
        'model/fc.weight[3:6,0:8]'
    """
    region = ",".join(f"{o}:{o + s}" for o, s in zip(box.offsets, box.sizes))
    return f"{name}[{region}]"


def intersect(a: Box, b: Box) -> Box | None:
    """The region ``a`` and ``b`` share, or None when they share no element.

    Example:
        >>> intersect(Box((0,), (4,)), Box((2,), (4,)))
        Box(offsets=(2,), sizes=(2,))
    """
    offsets, sizes = [], []
    for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes):
        start, end = max(ao, bo), min(ao + asz, bo + bsz)
        if end <= start:
            return None
        offsets.append(start)
        sizes.append(end - start)
    return Box(tuple(offsets), tuple(sizes))


def copy_overlap(
    source: memoryview, source_box: Box, out: np.ndarray[Any, Any], out_box: Box, itemsize: int
) -> int:
    """Copy the elements ``source_box`` and ``out_box`` share from ``source`` (the bytes of
    ``source_box``, C order) into ``out`` (a uint8 array of ``out_box``'s bytes).

    Returns how many elements were copied (0 when the boxes do not meet).

    Example:
        >>> out = np.zeros(2 * 4, np.uint8)
        >>> src = np.arange(5, 8, dtype=np.int32)
        >>> copy_overlap(memoryview(src).cast("B"), Box((1,), (3,)), out, Box((0,), (2,)), 4)
        1
        >>> out.view(np.int32).tolist()
        [0, 5]
    """
    part = intersect(source_box, out_box)
    if part is None:
        return 0
    src = np.frombuffer(source, np.uint8).reshape(*source_box.sizes, itemsize)
    dst = out.reshape(*out_box.sizes, itemsize)
    src_at = tuple(
        slice(p - o, p - o + n) for p, o, n in zip(part.offsets, source_box.offsets, part.sizes)
    )
    dst_at = tuple(
        slice(p - o, p - o + n) for p, o, n in zip(part.offsets, out_box.offsets, part.sizes)
    )
    dst[dst_at] = src[src_at]
    return part.volume


def encode_sharded(sharded: Mapping[str, ShardedEntry]) -> dict[str, Any]:
    """The manifest's ``sharded`` field (JSON) for ``sharded``; boxes in offset order."""
    return {
        name: {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "boxes": [[list(b.offsets), list(b.sizes)] for b in sorted(e.boxes)],
        }
        for name, e in sharded.items()
    }


def saved_boxes(
    name: str, sharded: Mapping[str, ShardedEntry], tensors: Mapping[str, TensorEntry]
) -> tuple[str, tuple[int, ...], list[tuple[Box, str]]] | None:
    """How tensor ``name`` is stored: (dtype code, global shape, [(box, data tensor name)]).

    A tensor stored whole is one box at the origin under its own name; None when the
    checkpoint holds no tensor ``name``.
    """
    entry = sharded.get(name)
    if entry is not None:
        return entry.dtype, entry.shape, [(b, box_tensor_name(name, b)) for b in entry.boxes]
    whole = tensors.get(name)
    if whole is None:
        return None
    box = Box((0,) * len(whole.shape), whole.shape)
    return whole.dtype, whole.shape, [(box, name)]


def logical_tensors(
    sharded: Mapping[str, ShardedEntry], tensors: Mapping[str, TensorEntry]
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a reader sees, name -> (dtype code, shape): the sharded ones whole,
    their boxes' data tensors left out."""
    boxes = {box_tensor_name(n, b) for n, e in sharded.items() for b in e.boxes}
    found = {n: (e.dtype, e.shape) for n, e in tensors.items() if n not in boxes}
    found.update((n, (e.dtype, e.shape)) for n, e in sharded.items())
    return found


def decode_sharded(
    value: object, tensors: Mapping[str, TensorEntry], fail: Callable[[str], Exception]
) -> dict[str, ShardedEntry]:
    """Validate the manifest's ``sharded`` field against its data tensors ``tensors``.

    Every box must lie inside its tensor, name a data tensor of the same dtype and of
    the box's sizes, and the boxes of a tensor must not overlap and must cover every
    element once. Nothing is allocated from the field's numbers: a global shape is only
    believed when boxes the data files really hold cover it.

    Raises:
      what ``fail`` makes of the first problem (``DataLossError`` in ``manifest_decode``).
    """
    if not isinstance(value, dict):
        raise fail("'sharded' is not a JSON object")
    result: dict[str, ShardedEntry] = {}
    for name, doc in value.items():
        if name in tensors:
            raise fail(f"sharded tensor {name!r} is also stored whole")
        if not isinstance(doc, dict) or set(doc) != {"dtype", "shape", "boxes"}:
            raise fail(f"sharded tensor {name!r}: expected an object of dtype, shape and boxes")
        dtype, shape, boxes = doc["dtype"], doc["shape"], doc["boxes"]
        if type(dtype) is not str or dtype not in DTYPE_ITEMSIZE:
            raise fail(f"sharded tensor {name!r}: unknown dtype {dtype!r}")
        if not _is_shape(shape):
            raise fail(f"sharded tensor {name!r}: shape {shape!r} is not a list of sizes")
        if type(boxes) is not list or len(boxes) > MAX_BOXES:
            raise fail(f"sharded tensor {name!r}: 'boxes' is not a list of at most {MAX_BOXES}")
        entry = ShardedEntry(dtype, tuple(shape), tuple(_box(name, shape, b, fail) for b in boxes))
        _check_data(name, entry, tensors, fail)
        _check_cover(name, entry, fail)
        result[name] = entry
    return result


def _is_shape(shape: object) -> bool:
    return (
        type(shape) is list
        and len(shape) <= _MAX_NDIM
        and all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
    )


def _box(name: str, shape: list[int], doc: object, fail: Callable[[str], Exception]) -> Box:
    if not (type(doc) is list and len(doc) == 2 and _is_shape(doc[0]) and _is_shape(doc[1])):
        raise fail(f"sharded tensor {name!r}: box {str(doc)[:80]} is not [offsets, sizes]")
    offsets, sizes = doc
    if len(offsets) != len(shape) or len(sizes) != len(shape):
        raise fail(f"sharded tensor {name!r}: box {doc!r} has not {len(shape)} dimensions")
    if any(o + s > d for o, s, d in zip(offsets, sizes, shape)) or not all(sizes):
        raise fail(f"sharded tensor {name!r}: box {doc!r} is empty or outside shape {shape}")
    return Box(tuple(offsets), tuple(sizes))


def _check_data(
    name: str,
    entry: ShardedEntry,
    tensors: Mapping[str, TensorEntry],
    fail: Callable[[str], Exception],
) -> None:
    for box in entry.boxes:
        stored = tensors.get(box_tensor_name(name, box))
        if stored is None:
            raise fail(
                f"sharded tensor {name!r}: box {box_tensor_name(name, box)!r} is missing "
                "from the data files"
            )
        if stored.dtype != entry.dtype or stored.shape != box.sizes:
            raise fail(
                f"sharded tensor {name!r}: box {box_tensor_name(name, box)!r} is stored as "
                f"{stored.dtype} {list(stored.shape)}"
            )


def _check_cover(name: str, entry: ShardedEntry, fail: Callable[[str], Exception]) -> None:
    """No two boxes overlap and together they hold every element (a sweep along dim 0)."""
    boxes = sorted(entry.boxes)
    for i, a in enumerate(boxes):
        end = a.offsets[0] + a.sizes[0] if a.offsets else 0
        for b in _following(boxes, i):
            if b.offsets and b.offsets[0] >= end:
                break
            if intersect(a, b) is not None:
                raise fail(f"sharded tensor {name!r}: boxes {list(a)} and {list(b)} overlap")
    covered = sum(b.volume for b in boxes)
    if covered != math.prod(entry.shape):
        raise fail(
            f"sharded tensor {name!r}: its boxes hold {covered} of the "
            f"{math.prod(entry.shape)} elements of shape {list(entry.shape)}; boxes are missing"
        )


def _following(boxes: list[Box], i: int) -> Iterable[Box]:
    return boxes[i + 1 :]
