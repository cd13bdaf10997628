"""Which ``Storage`` a path lives on, from its scheme.

``"ckpt/run"`` and ``"/abs/run"`` are the local disk; ``"memory://bucket/run"`` is this
process's :class:`MemoryStorage`; ``"s3://bucket/run"`` is S3 or an S3-compatible store
(:class:`~trainhooks.checkpoint.storage.s3.S3Storage`, configured from the standard AWS
environment; ``pip install 'trainhooks[s3]'``). :func:`register_storage` makes the paths
under a prefix resolve to a storage of the caller's (an ``S3Storage`` with explicit
``storage_options``, say). Any ``scheme://`` else (``file://`` included: pass the plain
path) is refused with an error that says which paths work, so that a path such as
``"gs://bucket/run"`` never silently becomes a local directory named ``gs:``.
"""

from __future__ import annotations

import functools
import os
import re
import threading

from trainhooks.checkpoint.storage.base import Storage

__all__ = ["is_url", "register_storage", "storage_for"]

_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
_registered: dict[str, Storage] = {}
_registered_lock = threading.Lock()
_UNSUPPORTED = {
    "gs": "Google Cloud Storage",
    "gcs": "Google Cloud Storage",
    "az": "Azure Blob Storage",
    "abfs": "Azure Blob Storage",
}


def is_url(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` starts with ``scheme://``."""
    return _SCHEME.match(os.fspath(path)) is not None


def register_storage(prefix: str, storage: Storage | None) -> None:
    """Make every path under the URL ``prefix`` resolve to ``storage`` (None: undo).

    The longest registered prefix of a path wins; paths under no registered prefix
    resolve by their scheme.

    Example:
        >>> from trainhooks.checkpoint.storage import MemoryStorage
        >>> mine = MemoryStorage()
        >>> register_storage("memory://mine", mine)
        >>> storage_for("memory://mine/run") is mine
        True
        >>> register_storage("memory://mine", None)
    """
    if not is_url(prefix):
        raise ValueError(f"register_storage takes a URL prefix (s3://bucket/run), got {prefix!r}")
    key = prefix.rstrip("/")
    with _registered_lock:
        if storage is None:
            _registered.pop(key, None)
        else:
            _registered[key] = storage


def _registered_for(path: str) -> Storage | None:
    with _registered_lock:
        found = [p for p in _registered if path == p or path.startswith(p + "/")]
        return _registered[max(found, key=len)] if found else None


def storage_for(path: str | os.PathLike[str]) -> Storage:
    """The storage that holds ``path``.

    Raises:
      ValueError: ``path`` has a scheme trainhooks has no storage for.
      ImportError: an ``s3://`` path, and the ``s3`` extra is not installed.

    Example:
        >>> storage_for("ckpt/run")
        LocalStorage(direct_io=True, rename=True)
        >>> storage_for("ftp://host/run")
        Traceback (most recent call last):
        ...
        ValueError: No storage for 'ftp://' in 'ftp://host/run': trainhooks stores checkpoints on the local disk (a plain path), in memory (memory://) or on S3 and S3-compatible stores (s3://).
    """
    path = os.fspath(path)
    match = _SCHEME.match(path)
    if match is None:
        return _local()
    registered = _registered_for(path)
    if registered is not None:
        return registered
    scheme = match["scheme"]
    if scheme == "memory":
        return _memory()
    if scheme in ("s3", "s3a"):
        if scheme == "s3a":
            raise ValueError(f"Write {path!r} as s3://{path[len('s3a://') :]}.")
        return s3_default()
    where = _UNSUPPORTED.get(scheme)
    if where is not None:
        raise ValueError(
            f"No storage for '{scheme}://' in {path!r}: {where} is not supported yet; "
            "trainhooks stores checkpoints on the local disk, in memory (memory://) or on S3 "
            "and S3-compatible stores (s3://, with AWS_ENDPOINT_URL naming the endpoint)."
        )
    raise ValueError(
        f"No storage for '{scheme}://' in {path!r}: trainhooks stores checkpoints on the "
        "local disk (a plain path), in memory (memory://) or on S3 and S3-compatible stores "
        "(s3://)."
    )


@functools.cache
def _local() -> Storage:
    from trainhooks.checkpoint.storage.local import LocalStorage

    return LocalStorage()


@functools.cache
def _memory() -> Storage:
    from trainhooks.checkpoint.storage.memory import MemoryStorage

    return MemoryStorage()


@functools.cache
def s3_default() -> Storage:
    """The ``S3Storage`` that ``s3://`` paths resolve to, configured from the environment
    when first used (``s3_default.cache_clear()`` forgets it)."""
    from trainhooks.checkpoint.storage.s3 import S3Storage

    return S3Storage()
