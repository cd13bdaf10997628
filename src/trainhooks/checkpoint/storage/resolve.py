"""Which ``Storage`` a path lives on, from its scheme.

``"ckpt/run"`` and ``"/abs/run"`` are the local disk; ``"memory://bucket/run"`` is this
process's :class:`MemoryStorage`. Any ``scheme://`` else (``file://`` included: pass the
plain path) is refused with an error that says which paths work, so that a path such as
``"s3://bucket/run"`` never silently becomes a local directory named ``s3:``.
"""

from __future__ import annotations

import functools
import os
import re

from trainhooks.checkpoint.storage.base import Storage

__all__ = ["is_url", "storage_for"]

_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` starts with ``scheme://``."""
    return _SCHEME.match(os.fspath(path)) is not None


def storage_for(path: str | os.PathLike[str]) -> Storage:
    """The storage that holds ``path``.

    Raises:
      ValueError: ``path`` has a scheme trainhooks has no storage for.

    Example:
        >>> storage_for("ckpt/run")
        LocalStorage(direct_io=True, rename=True)
        >>> storage_for("ftp://host/run")
        Traceback (most recent call last):
        ...
        ValueError: No storage for 'ftp://' in 'ftp://host/run': trainhooks stores checkpoints on the local disk (a plain path) or in memory (memory://).
    """
    match = _SCHEME.match(os.fspath(path))
    if match is None:
        return _local()
    if match["scheme"] == "memory":
        return _memory()
    raise ValueError(
        f"No storage for '{match['scheme']}://' in {os.fspath(path)!r}: trainhooks stores "
        "checkpoints on the local disk (a plain path) or in memory (memory://)."
    )


@functools.cache
def _local() -> Storage:
    from trainhooks.checkpoint.storage.local import LocalStorage

    return LocalStorage()


@functools.cache
def _memory() -> Storage:
    from trainhooks.checkpoint.storage.memory import MemoryStorage

    return MemoryStorage()
