"""Durable copies for the listeners: a checkpoint directory, or a JSON file, all or nothing.

A copy is made durable the way the Saver commits (``docs/format.md``): files are written into
a temporary directory (``<name>.partial-<random>``) and fsynced, the directory is renamed
into place, and the parent is fsynced. A copy being replaced is first moved aside
(``<name>.replaced-<random>``); :func:`clean_leftovers` tidies up after a crash.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from trainhooks.checkpoint.storage import LocalStorage, storage_for
from trainhooks.checkpoint.storage.commit import MANIFEST_NAME, delete_checkpoint, remove_quietly

__all__ = [
    "clean_leftovers",
    "copy_file_durably",
    "place_checkpoint",
    "write_json_durably",
]

_PARTIAL = ".partial-"  # a copy being written
_REPLACED = ".replaced-"  # an older copy moved aside while its replacement is renamed in
_COPY_BYTES = 1 << 20


def copy_file_durably(src: str, dst: str) -> None:
    """Copy file ``src`` to the new file ``dst`` and fsync it."""
    source = storage_for(src).open_read(src)
    try:
        out = storage_for(dst).create(dst)
        try:
            view = source.view()
            for start in range(0, len(view), _COPY_BYTES):
                out.write([view[start : start + _COPY_BYTES]])
            out.fsync()
        finally:
            out.close()
    finally:
        source.close()


def place_checkpoint(src: str, dst: str, *, hard_link: bool) -> None:
    """Make ``dst`` a durable copy of the checkpoint directory ``src``, replacing it if present.

    With ``hard_link`` every file is hard-linked (the Saver already fsynced its data),
    falling back to a copy where the file system refuses links.
    """
    storage = storage_for(dst)
    if not storage.can_rename:
        _place_manifest_last(src, dst)
        return
    parent = os.path.dirname(dst)
    tmp = f"{dst}{_PARTIAL}{uuid.uuid4().hex}"
    storage.makedirs(tmp)
    for name in storage_for(src).list_dir(src):
        src_file, dst_file = os.path.join(src, name), os.path.join(tmp, name)
        if hard_link and isinstance(storage, LocalStorage):
            try:
                os.link(src_file, dst_file)
                continue
            except OSError:  # another device, or links unsupported: copy instead
                pass
        copy_file_durably(src_file, dst_file)
    storage.fsync_dir(tmp)
    replaced = None
    if storage.exists(dst):
        # A directory cannot be renamed over a non-empty one: move the old copy aside.
        replaced = f"{dst}{_REPLACED}{uuid.uuid4().hex}"
        storage.rename(dst, replaced)
    storage.rename(tmp, dst)
    storage.fsync_dir(parent)
    if replaced is not None:
        remove_quietly(storage, replaced)


def _place_manifest_last(src: str, dst: str) -> None:
    """On a store without rename (an object store): the data files, then the manifest,
    the commit record, last; a copy being replaced is first uncommitted and removed."""
    storage = storage_for(dst)
    if storage.exists(dst):
        delete_checkpoint(dst, storage=storage)  # its manifest first
    names = storage_for(src).list_dir(src)
    for name in names:
        if name != MANIFEST_NAME:
            copy_file_durably(os.path.join(src, name), os.path.join(dst, name))
    manifest = storage_for(src).read_bytes(os.path.join(src, MANIFEST_NAME), max_bytes=1 << 30)
    storage.put(os.path.join(dst, MANIFEST_NAME), manifest, if_absent=True)


def clean_leftovers(directory: str) -> None:
    """Remove partial copies a crash left in ``directory``; put back a copy moved aside."""
    storage = storage_for(directory)
    for name in sorted(storage.list_dir(directory)):
        path = os.path.join(directory, name)
        if _PARTIAL in name:
            remove_quietly(storage, path)
        elif _REPLACED in name:
            original = os.path.join(directory, name.split(_REPLACED)[0])
            if storage.exists(original):
                remove_quietly(storage, path)
            else:
                storage.rename(path, original)


def write_json_durably(path: str, value: Any) -> None:
    """Replace ``path`` atomically and durably with ``value`` as JSON (no NaN allowed).

    Example:
        >>> write_json_durably("/tmp/best/best_checkpoints.json", {"mode": "min"})  # doctest: +SKIP
    """
    data = json.dumps(value, indent=1, allow_nan=False).encode("utf-8")
    storage_for(path).put(path, data)
