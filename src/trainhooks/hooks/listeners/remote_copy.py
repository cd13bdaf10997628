"""Copying a committed checkpoint to another store with that store's own commit.

:func:`copy_checkpoint` writes a checkpoint's data files and then its manifest through
``storage/commit.py``, exactly as a save into the destination would: on an object store
the data objects get a new per-copy token in their names and the manifest, put last
with a create-only or compare-and-swap condition, is the commit; on a local disk the
copy is staged and renamed into place. A failed copy removes what it wrote and never
leaves a manifest behind.

:func:`hold_checkpoint` hard-links a local checkpoint's files into a holding directory,
so that the Saver's retention may delete the checkpoint while a background upload is
still reading it.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil

from trainhooks.checkpoint.format.manifest import MAX_MANIFEST_BYTES, encode_manifest
from trainhooks.checkpoint.format.manifest_decode import decode_manifest
from trainhooks.checkpoint.storage import LocalStorage, storage_for
from trainhooks.checkpoint.storage.commit import (
    MANIFEST_NAME,
    abort_staging,
    begin_staging,
    commit_staging,
)
from trainhooks.hooks.listeners.durable import copy_file_durably

__all__ = ["HOLDING_DIR", "copy_checkpoint", "hold_checkpoint", "release_hold"]

#: The directory below ``checkpoint_dir`` holding links to checkpoints being uploaded;
#: its name is no checkpoint's, so listings and the Saver's clean-up pass it by.
HOLDING_DIR = ".trainhooks-upload"

# A token a manifest-last save put into a data file's name; a copy writes its own.
_TOKEN = re.compile(r"\.[0-9a-f]{12}(?=\.safetensors$)")


def copy_checkpoint(src: str, dst: str) -> None:
    """Copy the committed checkpoint directory ``src`` to ``dst``, committing it there last.

    The manifest at ``src`` is read and checked first; only the data files it lists are
    copied. ``dst`` may hold an older copy of the same step: it stays listed until the
    new manifest replaces it (a compare-and-swap on an object store).

    Raises:
      DataLossError: the manifest at ``src`` is damaged.
      OSError: a read or write failed; nothing new is committed at ``dst``.

    Example:
        >>> copy_checkpoint("/tmp/run/model.ckpt-5", "s3://bucket/run/model.ckpt-5")  # doctest: +SKIP
    """
    raw = storage_for(src).read_bytes(
        os.path.join(src, MANIFEST_NAME), max_bytes=MAX_MANIFEST_BYTES
    )
    manifest = decode_manifest(raw, src)
    storage = storage_for(dst)
    staging = begin_staging(storage, dst)
    try:
        for name in manifest.files:
            copy_file_durably(os.path.join(src, name), staging.path(_TOKEN.sub("", name)))
        storage.fsync_dir(staging.directory)
    except BaseException:
        abort_staging(storage, staging)
        raise
    files = {staging.name(_TOKEN.sub("", n)): entry for n, entry in manifest.files.items()}
    commit_staging(storage, staging, encode_manifest(manifest._replace(files=files)))


def hold_checkpoint(src: str) -> str | None:
    """Hard-link the files of the local checkpoint ``src`` into a new holding directory.

    Returns the holding directory (``<checkpoint_dir>/.trainhooks-upload/<name>.<random>``),
    which reads as the checkpoint itself; None where links cannot be made (another
    store, or a file system without hard links): then read ``src`` itself.

    Example:
        >>> hold_checkpoint("/nonexistent/run/model.ckpt-5") is None
        True
    """
    if not isinstance(storage_for(src), LocalStorage):
        return None
    held = os.path.join(
        os.path.dirname(src), HOLDING_DIR, f"{os.path.basename(src)}.{secrets.token_hex(6)}"
    )
    try:
        os.makedirs(held)
        for name in os.listdir(src):
            os.link(os.path.join(src, name), os.path.join(held, name))
    except OSError:
        release_hold(held)
        return None
    return held


def release_hold(held: str) -> None:
    """Remove a holding directory made by :func:`hold_checkpoint` (its links only)."""
    shutil.rmtree(held, ignore_errors=True)
