"""``paused_gc``: the cyclic garbage collector off for a burst of allocations.

Flattening or restoring a state of 100k tensors, and writing or parsing its manifest,
creates hundreds of thousands of containers, none of them garbage; each automatic
collection on the way would walk every object of the process.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["paused_gc"]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector for a burst of allocations (parsing a manifest,
    flattening or restoring a state of 100k tensors).

    Those create hundreds of thousands of containers, none of them garbage; each
    automatic collection on the way would walk every object of the process. Pausing
    made such a burst 2-5x faster (benchmarks/README.md). Only re-enables the collector
    if it was enabled on entry.

    Example:
        >>> with paused_gc():
        ...     rows = [[i] for i in range(3)]
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
