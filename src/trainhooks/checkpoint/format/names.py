"""Tensor and key names: finding the one that repeats, for the message that names it.

Callers test for a repeat in bulk first (``len(set(names)) != len(names)``, a C pass)
and call :func:`first_duplicate` only to name it, so this needs no fast path.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TypeVar

__all__ = ["first_duplicate"]

H = TypeVar("H", bound=Hashable)


def first_duplicate(names: Iterable[H]) -> H | None:
    """The first name equal to an earlier one, or None if every name is distinct.

    Example:
        >>> first_duplicate(["a", "b", "b", "a"])
        'b'
        >>> first_duplicate(["a", "b"]) is None
        True
    """
    seen: set[H] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None
