"""Python values in the JSON tree: bool, int, float, str, bytes and None.

Each value is a tagged JSON object so that its type survives JSON (``1`` vs ``1.0`` vs
``True``). Floats round-trip exactly: finite ones as JSON numbers (Python writes the
shortest repr that reads back to the same double), NaN and infinities as strings, a NaN
other than the default quiet one with its bit pattern. Bytes are base64.
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

__all__ = ["DICT_KEY_TYPES", "decode_key", "decode_value", "encode_key", "encode_value", "is_value"]

_VALUE_TYPES = (bool, int, float, str, bytes, type(None))
#: types a dict key may have (besides str, which is stored as itself).
DICT_KEY_TYPES = (bool, int, float, type(None))
_DEFAULT_NAN_BITS = 0x7FF8000000000000


def is_value(value: object) -> bool:
    """Whether ``value`` is stored in the JSON tree (a bool, int, float, str, bytes or None)."""
    return isinstance(value, _VALUE_TYPES)


def _float_bits(value: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", value))[0])


def _encode_float(value: float) -> float | str:
    if math.isfinite(value):
        return value
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    bits = _float_bits(value)
    return "nan" if bits == _DEFAULT_NAN_BITS else f"nan:{bits:016x}"


def _decode_float(value: float | int | str) -> float:
    if not isinstance(value, str):
        return float(value)
    if value.startswith("nan:"):
        return float(struct.unpack("<d", struct.pack("<Q", int(value[4:], 16)))[0])
    return float(value)


def encode_value(value: Any) -> dict[str, Any]:
    """The tree node of a Python value; subclasses (IntEnum, np.float64) store their base type.

    Example:
        >>> encode_value(float("inf"))
        {'type': 'float', 'value': 'inf'}
    """
    if value is None:
        return {"type": "none"}
    if isinstance(value, bool):
        return {"type": "bool", "value": bool(value)}
    if isinstance(value, int):
        return {"type": "int", "value": int(value)}
    if isinstance(value, float):
        return {"type": "float", "value": _encode_float(float(value))}
    if isinstance(value, str):
        return {"type": "str", "value": str(value)}
    if isinstance(value, bytes):
        return {"type": "bytes", "value": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not a Python value stored in the tree")


def decode_value(node: dict[str, Any]) -> Any:
    """The Python value of a node written by :func:`encode_value`."""
    kind = node["type"]
    if kind == "none":
        return None
    if kind == "bool":
        return bool(node["value"])
    if kind == "int":
        return int(node["value"])
    if kind == "float":
        return _decode_float(node["value"])
    if kind == "str":
        return str(node["value"])
    if kind == "bytes":
        return base64.b64decode(node["value"])
    raise ValueError(f"Unknown value node type {kind!r}")


def encode_key(key: Any) -> Any:
    """A dict key in the tree: a str as itself, a bool/int/float/None as its value node."""
    return key if isinstance(key, str) else encode_value(key)


def decode_key(key: Any) -> Any:
    """The dict key :func:`encode_key` wrote."""
    return key if isinstance(key, str) else decode_value(key)
