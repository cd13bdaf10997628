"""What ``write_checkpoint`` accepts: the tensors of a flattened state, checked before writing.

:func:`check_flat` turns ``FlatState.tensors`` into the columns the data files are
written from (``columns.TensorColumns``), the global step first, and refuses, before a
byte is written, any tensor that the format cannot hold: a repeated or reserved name,
an unknown dtype code, a buffer whose size does not match its shape, or one that is not
C-contiguous. Arrays that ``tree.flatten_state`` kept as they are were checked when
they were flattened and are not looked at again.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.manifest import GLOBAL_STEP_NAME
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData

__all__ = ["FlatStateLike", "check_flat"]


class FlatStateLike(Protocol):
    """What ``commit.write_checkpoint`` needs of ``tree.FlatState``."""

    @property
    def tensors(self) -> Mapping[str, TensorData]: ...

    @property
    def tree(self) -> Any: ...


def check_flat(
    flat: FlatStateLike, global_step: int, *, names_checked: bool = False
) -> TensorColumns:
    """``flat.tensors`` as columns, the global step first; raises for what cannot be written.

    Args:
      flat: what ``write_checkpoint`` was given (``tree.FlatState`` or alike).
      global_step: the step, stored as the 0-d I64 tensor ``"global_step"``.
      names_checked: the names are those of a save this function checked before (a
        saver's ``SaveCache`` compared them): they are not checked again.

    Returns:
      Columns of every tensor to write, the global step first.

    Raises:
      TypeError: ``global_step`` is not an int.
      ValueError: a tensor name repeats or is reserved, or a tensor's dtype, size or
        layout cannot be stored; the message names the tensor.

    Example:
        >>> import collections, numpy as np
        >>> Flat = collections.namedtuple("Flat", "tensors tree")
        >>> check_flat(Flat({}, {}), 7).names
        ['global_step']
    """
    if not isinstance(global_step, int) or isinstance(global_step, bool):
        raise TypeError(f"global_step must be an int, got {global_step!r}")
    if not -(2**63) <= global_step < 2**63:
        raise ValueError(f"global_step {global_step} does not fit in 64 bits")
    columns = TensorColumns.from_mapping(flat.tensors)
    names = columns.names
    if not names_checked:
        unique = set(names)
        if len(unique) != len(names):
            raise ValueError(
                f"{len(names) - len(unique)} tensor names repeat; every tensor needs its own name"
            )
        for name in unique.intersection((GLOBAL_STEP_NAME, "__metadata__", "")):
            _refuse(name, columns[name])
    itemsizes, prod = DTYPE_ITEMSIZE, math.prod
    # Plain arrays only (a state of 100k small ones): one pass in C, nothing to look at.
    checked = set(map(type, columns.sources)) <= {np.ndarray}
    for name, code, source in () if checked else zip(names, columns.codes, columns.sources):
        if type(source) is np.ndarray:
            continue  # flatten_state's own: a dtype in GATHER_DTYPES with its code and shape
        t: TensorData = source  # type: ignore[assignment]
        itemsize = itemsizes.get(t.dtype) if type(t.dtype) is str else None
        if (
            type(name) is not str
            or itemsize is None
            or t.dtype != code
            or t.buffer.nbytes != itemsize * prod(t.shape)
            or not t.buffer.c_contiguous
        ):
            _refuse(name, t)
    step = TensorData("I64", (), memoryview(struct.pack("<q", global_step)))
    return TensorColumns(
        [GLOBAL_STEP_NAME, *names],
        ["I64", *columns.codes],
        [(), *columns.shapes],
        [step, *columns.sources],
    )


def _refuse(name: object, t: TensorData) -> None:
    """Raise the error that says why ``flat.tensors[name]`` cannot be written."""
    if name == GLOBAL_STEP_NAME:
        raise ValueError(
            f"the tensor name {GLOBAL_STEP_NAME!r} is reserved for the global step; "
            "pass the step as global_step= and rename the tensor"
        )
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(
            f"tensor names must be non-empty strings other than '__metadata__' "
            f"(reserved by safetensors), got {name!r}"
        )
    if t.dtype not in DTYPE_ITEMSIZE:
        raise ValueError(
            f"tensor {name!r}: unknown dtype code {t.dtype!r}; use one of {sorted(DTYPE_ITEMSIZE)}"
        )
    if t.buffer.nbytes != t.nbytes:
        raise ValueError(
            f"tensor {name!r}: buffer holds {t.buffer.nbytes} bytes, but shape {t.shape} "
            f"of {t.dtype} needs {t.nbytes}"
        )
    raise ValueError(f"tensor {name!r}: buffer is not C-contiguous")
