"""``TensorData``: one array as the checkpoint layer sees it (dtype code, shape, raw bytes).

Every framework adapter turns its arrays into ``TensorData`` and back; the format
layer writes and reads nothing else. Dtype codes are safetensors' own, so a data file
is a plain safetensors file.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["DTYPE_ITEMSIZE", "TensorData"]

#: safetensors dtype code -> bytes per element.
DTYPE_ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


class TensorData(NamedTuple):
    """An array's dtype code, shape and C-contiguous bytes.

    ``buffer`` is a byte-format memoryview of exactly ``nbytes`` bytes; it may alias the
    source array (zero-copy), so it is valid only while the source is unchanged.
    """

    dtype: str
    shape: tuple[int, ...]
    buffer: memoryview

    @property
    def nbytes(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype] * math.prod(self.shape)
