"""Opening a checkpoint directory: manifest, sizes and headers checked, files mapped.

::

    <prefix>/manifest.json                      the commit record, written last
    <prefix>/data-00000-of-00002.safetensors    standard safetensors files
    <prefix>/data-00001-of-00002.safetensors

:func:`write_checkpoint` (``saving/write.py``) writes one and ``storage/commit.py``
publishes it; :func:`open_checkpoint` checks the manifest and every data file's size and header,
memory-maps the files and returns a :class:`MappedCheckpoint` (``mapped_checkpoint.py``)
whose tensors are checksummed before they are handed out. The manifest schema is in
``manifest.py`` (read back by ``manifest_decode.py``), the data files in ``datafile.py``.

Threat model (a checkpoint may come from anywhere): file names are plain basenames
opened relative to the checkpoint directory without following symlinks; header
lengths, shapes and byte ranges are bounded by the real file sizes before anything is
allocated; duplicate JSON keys are refused; truncation, extension and bit flips are
caught by the size and checksum checks. Not covered: a file truncated in place
*after* it was opened (the mapping then faults with SIGBUS); checkpoints are never
modified in place by trainhooks.
"""

from __future__ import annotations

import os

from trainhooks.checkpoint.format.datafile import verify_header
from trainhooks.checkpoint.format.manifest import (
    GLOBAL_STEP_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
)
from trainhooks.checkpoint.format.manifest_decode import decode_manifest
from trainhooks.checkpoint.format.mapped_checkpoint import MappedCheckpoint
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.storage import DirectoryReader, ReadableFile, Storage, storage_for
from trainhooks.checkpoint.storage.commit import checkpoint_containing
from trainhooks.errors import DataLossError, NotFoundError

__all__ = [
    "MANIFEST_NAME",
    "MappedCheckpoint",
    "open_checkpoint",
]

# A re-save swaps the directory under a reader; it then starts over on the new one.
_OPEN_ATTEMPTS = 3


def open_checkpoint(
    prefix: str | os.PathLike[str], *, storage: Storage | None = None
) -> MappedCheckpoint:
    """Open the checkpoint directory at ``prefix``: manifest, sizes and headers checked.

    Files are opened relative to the directory as it was when opening began, so a
    concurrent re-save of the same prefix (which swaps in a new directory) is seen
    either entirely or not at all.

    Args:
      prefix: the checkpoint path, e.g. ``"ckpt/model.ckpt-200"``.
      storage: where it is stored (default: the storage its path names).

    Returns:
      A :class:`MappedCheckpoint`; call ``verify()`` to checksum everything.

    Raises:
      NotFoundError: nothing exists at ``prefix``.
      DataLossError: the manifest or a data file is missing, malformed or corrupt.

    Example:
        >>> ckpt = open_checkpoint("ckpt/model.ckpt-200")  # doctest: +SKIP
        >>> ckpt.global_step  # doctest: +SKIP
        200
    """
    prefix = os.fspath(prefix)
    prefix = prefix.rstrip("/") or prefix
    storage = storage_for(prefix) if storage is None else storage
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            directory = storage.open_directory(prefix)
        except FileNotFoundError:
            raise NotFoundError(f"Checkpoint {prefix} does not exist.") from None
        except NotADirectoryError:
            inside = checkpoint_containing(prefix)
            if inside is not None:
                raise NotFoundError(
                    f"{prefix} is a file of the trainhooks checkpoint {inside}: pass {inside}."
                ) from None
            raise NotFoundError(
                f"{prefix} is not a trainhooks checkpoint directory (a TensorFlow "
                "checkpoint? convert it, or pass the prefix of a trainhooks save)"
            ) from None
        try:
            return _open_at(prefix, directory)
        except DataLossError:
            if attempt + 1 < _OPEN_ATTEMPTS and directory.replaced():
                continue
            raise
        finally:
            directory.close()
    raise AssertionError("unreachable")


def _open_file(prefix: str, directory: DirectoryReader, name: str, what: str) -> ReadableFile:
    """Open ``name`` inside the checkpoint (a plain file: no symlinks, no FIFOs)."""
    where = f"Checkpoint {prefix}: {what} {name}"
    try:
        return directory.open_read(name)
    except FileNotFoundError:
        raise DataLossError(f"{where} is missing.") from None
    except IsADirectoryError:
        raise DataLossError(f"{where} is not a regular file.") from None
    except OSError as e:  # ELOOP: a symlink
        raise DataLossError(f"{where} cannot be opened ({e}); it must be a plain file.") from None


def _open_at(prefix: str, directory: DirectoryReader) -> MappedCheckpoint:
    file = _open_file(prefix, directory, MANIFEST_NAME, "manifest")
    try:
        if file.size > MAX_MANIFEST_BYTES:
            raise DataLossError(
                f"Checkpoint {prefix}: {MANIFEST_NAME} is {file.size} bytes; too large."
            )
        raw = bytearray(file.size)
        got = file.readinto(0, memoryview(raw)) if file.size else 0
        raw = raw[:got]
    finally:
        file.close()
    manifest = decode_manifest(bytes(raw), prefix)
    ckpt = MappedCheckpoint(prefix, manifest)
    opened: dict[str, ReadableFile] = {}
    try:
        for name in manifest.files:
            opened[name] = _open_file(prefix, directory, name, "data file")
        # Every file's header (its length is in the manifest) is asked for at once: a
        # cold disk then serves them side by side, not one page fault after another.
        # Only the headers: prefetching 8 MiB of each file competed with the restore's
        # own reads (512 MiB in three files, cold, median of 10: 0.350 s against 0.318 s).
        for name, data in opened.items():
            prefetch = getattr(data, "prefetch", None)
            if prefetch is not None:
                prefetch(0, min(data.size, manifest.files[name].data_start))
        for name, entry in manifest.files.items():

            def fail(message: str, file: str = name) -> DataLossError:
                return DataLossError(f"Checkpoint {prefix}: data file {file}: {message}")

            data = opened.pop(name)
            if data.size != entry.size:
                data.close()
                raise fail(
                    f"{data.size} bytes, the manifest says {entry.size}; it is "
                    f"{'truncated' if data.size < entry.size else 'extended'}"
                )
            mapped = ckpt.map_file(name, data)
            with paused_gc():
                verify_header(mapped, data.size, entry, fail)
        step = int.from_bytes(ckpt.tensor_data(GLOBAL_STEP_NAME).buffer, "little", signed=True)
    except BaseException:
        for data in opened.values():
            data.close()
        ckpt.close()
        raise
    if step != manifest.global_step:
        ckpt.close()
        raise DataLossError(
            f"Checkpoint {prefix}: tensor {GLOBAL_STEP_NAME!r} holds {step}, "
            f"the manifest says {manifest.global_step}"
        )
    return ckpt
