"""Publishing a checkpoint directory: it appears at its prefix complete, or not at all.

Two commits behind one interface, chosen by the store (``Storage.can_rename``):

**Rename** (a local disk). A save writes everything into a staging directory ``<prefix>.tmp-<random>/`` (every
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

**Manifest last** (an object store, or ``LocalStorage(rename=False)``). Data files
are written straight under ``<prefix>/`` with a per-save token in their names
(``data-00000-of-00001.<token>.safetensors``), so no save ever overwrites another's
bytes; the manifest, written last with a conditional put (create-only, or
compare-and-swap against the manifest it replaces), is the commit. The data files of
a replaced manifest are deleted after it. After a crash, a prefix without a manifest
and data files that no manifest lists are leftovers, removed on the next start.

``manifest.json`` is the commit record: a directory without one was never committed.
Its name is defined here, the lowest layer that needs it; ``format/manifest.py`` says
what is inside.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Sequence
from typing import NamedTuple

from trainhooks.checkpoint.storage.base import Storage
from trainhooks.checkpoint.storage.resolve import storage_for

__all__ = [
    "MANIFEST_NAME",
    "delete_checkpoint",
    "holds_only_checkpoint_files",
    "is_checkpoint",
    "publish",
    "remove_leftovers",
    "remove_quietly",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
_LEFTOVER = re.compile(r"(?P<prefix>.+)\.(?P<kind>tmp|old)-[0-9a-f]{12}")
_CHECKPOINT_ENTRY = re.compile(
    r"manifest\.json|(?:data|shards)-\d{5,}-of-\d{5,}(?:\.[0-9a-f]{12})?\.safetensors"
)
_TOKENED = re.compile(r"data-.*\.(?P<token>[0-9a-f]{12})\.safetensors")


def _sibling(prefix: str, kind: str) -> str:
    return f"{prefix}.{kind}-{secrets.token_hex(6)}"


def _parent(prefix: str) -> str:
    return os.path.dirname(prefix) or os.curdir


def is_checkpoint(prefix: str | os.PathLike[str], *, storage: Storage | None = None) -> bool:
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
    storage = storage_for(prefix) if storage is None else storage
    return (
        storage.is_dir(prefix) and storage.version(os.path.join(prefix, MANIFEST_NAME)) is not None
    )


def checkpoint_containing(path: str) -> str | None:
    """The committed checkpoint that ``path`` is a file of (its manifest or a data file),
    or None: for messages that should say "pass the directory", not "TensorFlow".

    Example:
        >>> checkpoint_containing("/nonexistent/model.ckpt-5/manifest.json") is None
        True
    """
    parent = os.path.dirname(path.rstrip("/"))
    if parent and _CHECKPOINT_ENTRY.fullmatch(os.path.basename(path)) and is_checkpoint(parent):
        return parent
    return None


def holds_only_checkpoint_files(storage: Storage, prefix: str) -> bool:
    """True if ``prefix`` is a directory of nothing but a checkpoint's files.

    A checkpoint damaged after its commit (its manifest lost, say) is one; a re-save of
    its step may replace it. A directory holding anything else is never replaced.
    """
    if not storage.is_dir(prefix):
        return False
    entries = storage.list_dir(prefix)
    return bool(entries) and all(_CHECKPOINT_ENTRY.fullmatch(name) for name in entries)


class Staging(NamedTuple):
    """Where the files of one save go until it is committed (JSON-able, for other ranks).

    ``directory`` is a temporary directory beside ``prefix`` (rename commit), or
    ``prefix`` itself with ``token`` in every file name (manifest-last commit), where
    ``replaces`` is the version of the manifest at the prefix when the save began (None:
    there was none): the commit is a compare-and-swap against it.
    """

    prefix: str
    directory: str
    token: str
    replaces: str | None = None

    def path(self, name: str) -> str:
        """The path a file called ``name`` in the checkpoint is written to now."""
        if self.token and name.endswith(".safetensors"):
            name = f"{name[: -len('.safetensors')]}.{self.token}.safetensors"
        return os.path.join(self.directory, name)

    def name(self, name: str) -> str:
        """``name`` as the manifest lists it (with the token, where there is one)."""
        return os.path.basename(self.path(name))


def begin_staging(storage: Storage, prefix: str) -> Staging:
    """Make the place a new save of ``prefix`` writes its files into."""
    if storage.can_rename:
        tmp = _sibling(prefix, "tmp")
        storage.mkdir(tmp)
        return Staging(prefix, tmp, "")
    storage.makedirs(prefix)
    replaces = storage.version(os.path.join(prefix, MANIFEST_NAME))
    return Staging(prefix, prefix, secrets.token_hex(6), replaces)


def commit_staging(storage: Storage, staging: Staging, manifest: Sequence[bytes]) -> None:
    """Write the manifest and publish the save: it is at ``staging.prefix`` from now on.

    Every data file must already be durable. On failure nothing was committed and the
    staged files are removed; a checkpoint that was at the prefix is still there.

    Raises:
      PreconditionFailed, FileExistsError: (manifest last) another save committed this
        prefix since this one began; this one is not committed.
    """
    if not storage.can_rename:
        _commit_manifest_last(storage, staging, b"".join(manifest))
        return
    try:
        f = storage.create(os.path.join(staging.directory, MANIFEST_NAME))
        try:
            f.write(manifest)
            f.fsync()
        finally:
            f.close()
        storage.fsync_dir(staging.directory)
    except BaseException:
        abort_staging(storage, staging)
        raise
    publish(storage, staging.directory, staging.prefix)


def _commit_manifest_last(storage: Storage, staging: Staging, manifest: bytes) -> None:
    path = os.path.join(staging.prefix, MANIFEST_NAME)
    try:
        # The files of the checkpoint this one replaces: deleted once it is committed.
        replaced = _listed_files(storage, staging.prefix) if staging.replaces else set()
        if staging.replaces is None:
            storage.put(path, manifest, if_absent=True)
        else:
            storage.put(path, manifest, if_version=staging.replaces)
    except BaseException:
        abort_staging(storage, staging)
        raise
    # Committed: from here on a failure must not touch this save's files. What the
    # replaced manifest listed is no longer listed anywhere; what cannot be deleted now
    # is removed as unlisted at the next start.
    for name in sorted(replaced or ()):
        if f".{staging.token}." in name:
            continue  # this save's own file, listed by both
        try:
            storage.delete(os.path.join(staging.prefix, name))
        except OSError as e:
            logger.warning(
                "Could not remove %s of the replaced checkpoint %s (%s); it will be removed "
                "on the next start.",
                name,
                staging.prefix,
                e,
            )


def abort_staging(storage: Storage, staging: Staging) -> None:
    """Remove what an uncommitted save wrote; never a committed checkpoint's files."""
    if storage.can_rename:
        remove_quietly(storage, staging.directory)
        return
    try:
        for name in storage.list_dir(staging.directory):
            match = _TOKENED.fullmatch(name)
            if match is not None and match["token"] == staging.token:
                storage.delete(os.path.join(staging.directory, name))
    except OSError as e:
        logger.warning(
            "Could not remove the files of the failed save of %s (%s); they will be removed "
            "on the next start.",
            staging.prefix,
            e,
        )


def publish(storage: Storage, tmp: str, prefix: str) -> None:
    """Rename commit: make the complete directory ``tmp`` visible at ``prefix``."""
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
    not yet deleted) and ``<prefix>.old-*`` entries. On an object store, it also aborts
    the unfinished multipart uploads of checkpoint files, and removes checkpoint files
    that no manifest lists (never anything else). If a crash hit the fallback swap
    between its two renames, so that ``<prefix>`` is missing, the old checkpoint is
    renamed back to ``<prefix>`` instead of being removed.

    Call it only while no other process saves into ``directory``: it cannot tell a
    crashed save from one in progress.

    Example:
        >>> remove_leftovers("/tmp/run")  # doctest: +SKIP
        ['/tmp/run/model.ckpt-200.tmp-5f1c0e6a9b2d']
    """
    directory = os.fspath(directory)
    storage = storage_for(directory) if storage is None else storage
    removed: list[str] = []
    if not storage.can_rename:
        # An object store's unfinished uploads (a crashed save's) are invisible to
        # listings but kept, and billed, until aborted; only checkpoint files' are ours.
        abort_uploads = getattr(storage, "abort_uploads", None)
        if abort_uploads is not None:
            removed = abort_uploads(directory, _is_checkpoint_file)
        removed += _remove_unlisted(storage, directory)
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
    storage = storage_for(prefix) if storage is None else storage
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
    if not storage.can_rename:
        # The manifest goes first: from then on this is not a checkpoint, only leftovers.
        storage.delete(os.path.join(prefix, MANIFEST_NAME))
        storage.remove_tree(prefix)
        return
    doomed = _sibling(prefix, "tmp")
    try:
        storage.rename(prefix, doomed)
    except FileNotFoundError:
        return  # deleted concurrently
    storage.fsync_dir(_parent(prefix))
    storage.remove_tree(doomed)


def _is_checkpoint_file(relative: str) -> bool:
    """True for ``<checkpoint>/<a checkpoint's file>``, a path a save of ours writes."""
    prefix, _, name = relative.partition("/")
    return bool(prefix) and _CHECKPOINT_ENTRY.fullmatch(name) is not None


def _remove_unlisted(storage: Storage, directory: str) -> list[str]:
    """Manifest-last leftovers: prefixes of checkpoint files without a manifest, and
    data files that the manifest beside them does not list."""
    removed = []
    for name in sorted(storage.list_dir(directory)):
        prefix = os.path.join(directory, name)
        if not storage.is_dir(prefix):
            continue
        entries = storage.list_dir(prefix)
        if not entries or not all(_CHECKPOINT_ENTRY.fullmatch(e) for e in entries):
            continue  # not (only) checkpoint files: never ours to delete
        if MANIFEST_NAME not in entries:
            storage.remove_tree(prefix)
            removed.append(prefix)
            continue
        listed = _listed_files(storage, prefix)
        if listed is None:
            continue  # an unreadable manifest: keep everything, restore will report it
        for entry in entries:
            if entry != MANIFEST_NAME and entry not in listed:
                storage.delete(os.path.join(prefix, entry))
                removed.append(os.path.join(prefix, entry))
    return removed


def _listed_files(storage: Storage, prefix: str) -> set[str] | None:
    """The data file names a manifest lists (its ``files`` object), or None if unreadable.

    Only the names are read here, to decide what not to delete; the manifest itself is
    verified in full by ``format/manifest_decode.py`` before anything is restored.
    """
    try:
        doc = json.loads(storage.read_bytes(os.path.join(prefix, MANIFEST_NAME), max_bytes=1 << 30))
        files = doc["files"]
        return set(files) if isinstance(files, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
