"""Publishing a checkpoint directory: it appears at its prefix complete, or not at all.

A save writes everything into a staging directory ``<prefix>.tmp-<random>/`` (every
data file and ``manifest.json``, each fsynced, then the directory itself). Publishing
then makes it visible at ``<prefix>`` and fsyncs the parent:

* ``<prefix>`` absent: one ``rename``.
* ``<prefix>`` present (TF re-saves the step it restored): an atomic exchange of the
  two directories (Linux ``renameat2(RENAME_EXCHANGE)``), after which the old
  checkpoint sits at the temporary name and is deleted. ``<prefix>`` names a
  complete checkpoint at every instant.
* Where the store cannot exchange, the old directory is first renamed to
  ``<prefix>.old-<random>``, then the new one into place. For that instant
  ``<prefix>`` is missing; after a crash there, :func:`remove_leftovers` renames the
  old checkpoint back.

A crash at any point leaves at most ``*.tmp-*`` / ``*.old-*`` entries next to the
checkpoints, which :func:`remove_leftovers` deletes on the next start.

``manifest.json`` is the commit record: a directory without one was never committed.
Its name is defined here, the lowest layer that needs it; ``format/manifest.py`` says
what is inside.
"""

from __future__ import annotations

import logging
import os
import re
import secrets

from trainhooks.checkpoint.storage.base import Storage
from trainhooks.checkpoint.storage.local import LocalStorage

__all__ = [
    "MANIFEST_NAME",
    "delete_checkpoint",
    "is_checkpoint",
    "publish",
    "remove_leftovers",
    "remove_quietly",
    "staging_path",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_LEFTOVER = re.compile(r"(?P<prefix>.+)\.(?P<kind>tmp|old)-[0-9a-f]{12}")
_CHECKPOINT_ENTRY = re.compile(r"manifest\.json|data-\d{5,}-of-\d{5,}\.safetensors")


def _sibling(prefix: str, kind: str) -> str:
    return f"{prefix}.{kind}-{secrets.token_hex(6)}"


def staging_path(prefix: str) -> str:
    """A new temporary name beside ``prefix`` for a save in progress."""
    return _sibling(prefix, "tmp")


def _parent(prefix: str) -> str:
    return os.path.dirname(prefix) or os.curdir


def is_checkpoint(prefix: str | os.PathLike[str]) -> bool:
    """True if ``prefix`` is a committed checkpoint directory (it has a manifest).

    A temporary directory of a save in progress never counts, even once its manifest
    is written. This does not verify contents; :func:`~trainhooks.checkpoint.format.opening.open_checkpoint` does.

    Example:
        >>> is_checkpoint("/nonexistent/model.ckpt-10")
        False
    """
    prefix = os.fspath(prefix)
    if _LEFTOVER.fullmatch(os.path.basename(prefix.rstrip("/"))):
        return False
    return (
        os.path.isdir(prefix)
        and not os.path.islink(prefix)
        and os.path.isfile(os.path.join(prefix, MANIFEST_NAME))
    )


def publish(storage: Storage, tmp: str, prefix: str) -> None:
    """Make the complete directory ``tmp`` visible at ``prefix`` (replacing one there)."""
    parent = _parent(prefix)
    if not storage.exists(prefix):
        try:
            storage.rename(tmp, prefix)
        except FileExistsError:
            pass  # another save published the same prefix meanwhile: swap below
        else:
            storage.fsync_dir(parent)
            return
    if storage.exchange(tmp, prefix):
        storage.fsync_dir(parent)
        remove_quietly(storage, tmp)  # now the previous checkpoint
        return
    old = _sibling(prefix, "old")
    storage.rename(prefix, old)
    try:
        storage.rename(tmp, prefix)
    except BaseException:
        storage.rename(old, prefix)  # put the previous checkpoint back before failing
        remove_quietly(storage, tmp)
        raise
    storage.fsync_dir(parent)
    remove_quietly(storage, old)


def remove_quietly(storage: Storage, path: str) -> None:
    try:
        storage.remove_tree(path)
    except OSError as e:
        logger.warning("Could not remove %s (%s); it will be removed on the next start.", path, e)


def remove_leftovers(
    directory: str | os.PathLike[str], *, storage: Storage | None = None
) -> list[str]:
    """Delete what interrupted saves left in ``directory``; returns the paths removed.

    Removes ``<prefix>.tmp-*`` (saves that never committed, or a replaced checkpoint
    not yet deleted) and ``<prefix>.old-*`` entries. If a crash hit the fallback swap
    between its two renames, so that ``<prefix>`` is missing, the old checkpoint is
    renamed back to ``<prefix>`` instead of being removed.

    Call it only while no other process saves into ``directory``: it cannot tell a
    crashed save from one in progress.

    Example:
        >>> remove_leftovers("/tmp/run")  # doctest: +SKIP
        ['/tmp/run/model.ckpt-200.tmp-5f1c0e6a9b2d']
    """
    directory = os.fspath(directory)
    storage = LocalStorage() if storage is None else storage
    removed: list[str] = []
    for name in sorted(storage.list_dir(directory)):
        match = _LEFTOVER.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(directory, name)
        prefix = os.path.join(directory, match["prefix"])
        if (
            match["kind"] == "old"
            and not storage.exists(prefix)
            and storage.exists(os.path.join(path, MANIFEST_NAME))
        ):
            logger.warning("Restoring %s from %s, left by an interrupted save.", prefix, path)
            storage.rename(path, prefix)
            continue
        storage.remove_tree(path)
        removed.append(path)
    if removed:
        storage.fsync_dir(directory)
        logger.info("Removed %d leftovers of interrupted saves in %s.", len(removed), directory)
    return removed


def delete_checkpoint(prefix: str | os.PathLike[str], *, storage: Storage | None = None) -> None:
    """Delete the checkpoint directory at ``prefix``; a missing one is not an error.

    The directory is first renamed to a temporary name, so that a crash mid-way
    never leaves a half-deleted directory that looks like a checkpoint.

    Raises:
      ValueError: ``prefix`` holds files that a checkpoint does not have; nothing is deleted.

    Example:
        >>> delete_checkpoint("/tmp/run/model.ckpt-100")  # doctest: +SKIP
    """
    prefix = os.fspath(prefix).rstrip("/")
    storage = LocalStorage() if storage is None else storage
    if not storage.exists(prefix):
        return
    if not storage.is_dir(prefix):
        raise ValueError(f"{prefix} is not a checkpoint directory; not deleting it")
    foreign = [n for n in storage.list_dir(prefix) if not _CHECKPOINT_ENTRY.fullmatch(n)]
    if foreign:
        raise ValueError(
            f"{prefix} holds files that are not part of a checkpoint ({sorted(foreign)[:5]}); "
            "not deleting it"
        )
    doomed = _sibling(prefix, "tmp")
    try:
        storage.rename(prefix, doomed)
    except FileNotFoundError:
        return  # deleted concurrently
    storage.fsync_dir(_parent(prefix))
    storage.remove_tree(doomed)
