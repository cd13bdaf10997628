"""Durable copies for the listeners: a checkpoint directory, or a JSON file, all or nothing.

A copy is made durable the way the Saver commits (``docs/format.md``): files are written into
a temporary directory (``<name>.partial-<random>``) and fsynced, the directory is renamed
into place, and the parent is fsynced. A copy being replaced is first moved aside
(``<name>.replaced-<random>``); :func:`clean_leftovers` tidies up after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

__all__ = [
    "clean_leftovers",
    "copy_file_durably",
    "fsync_dir",
    "place_checkpoint",
    "write_json_durably",
]

_PARTIAL = ".partial-"  # a copy being written
_REPLACED = ".replaced-"  # an older copy moved aside while its replacement is renamed in


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file_durably(src: str, dst: str) -> None:
    """Copy file ``src`` to the new file ``dst`` and fsync it."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def place_checkpoint(src: str, dst: str, *, hard_link: bool) -> None:
    """Make ``dst`` a durable copy of the checkpoint directory ``src``, replacing it if present.

    With ``hard_link`` every file is hard-linked (the Saver already fsynced its data),
    falling back to a copy where the file system refuses links.
    """
    parent = os.path.dirname(dst)
    tmp = f"{dst}{_PARTIAL}{uuid.uuid4().hex}"
    for root, _, files in os.walk(src):
        target = os.path.join(tmp, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            src_file, dst_file = os.path.join(root, name), os.path.join(target, name)
            if hard_link:
                try:
                    os.link(src_file, dst_file)
                    continue
                except OSError:  # another device, or links unsupported: copy instead
                    pass
            copy_file_durably(src_file, dst_file)
        fsync_dir(target)
    replaced = None
    if os.path.lexists(dst):
        # A directory cannot be renamed over a non-empty one: move the old copy aside.
        replaced = f"{dst}{_REPLACED}{uuid.uuid4().hex}"
        os.rename(dst, replaced)
    os.rename(tmp, dst)
    fsync_dir(parent)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


def clean_leftovers(directory: str) -> None:
    """Remove partial copies a crash left in ``directory``; put back a copy moved aside."""
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _PARTIAL in name:
            shutil.rmtree(path, ignore_errors=True)
        elif _REPLACED in name:
            original = os.path.join(directory, name.split(_REPLACED)[0])
            if os.path.lexists(original):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, original)


def write_json_durably(path: str, value: Any) -> None:
    """Replace ``path`` atomically and durably with ``value`` as JSON (no NaN allowed).

    Example:
        >>> write_json_durably("/tmp/best/best_checkpoints.json", {"mode": "min"})  # doctest: +SKIP
    """
    tmp = f"{path}{_PARTIAL}{uuid.uuid4().hex}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
