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
import stat

from trainhooks.checkpoint.format.datafile import verify_header
from trainhooks.checkpoint.format.manifest import (
    GLOBAL_STEP_NAME,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
)
from trainhooks.checkpoint.format.manifest_decode import decode_manifest
from trainhooks.checkpoint.format.mapped_checkpoint import MappedCheckpoint
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.errors import DataLossError, NotFoundError

__all__ = [
    "MANIFEST_NAME",
    "MappedCheckpoint",
    "open_checkpoint",
]

# A re-save swaps the directory under a reader; it then starts over on the new one.
_OPEN_ATTEMPTS = 3
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def open_checkpoint(prefix: str | os.PathLike[str]) -> MappedCheckpoint:
    """Open the checkpoint directory at ``prefix``: manifest, sizes and headers checked.

    Files are opened relative to the directory as it was when opening began, so a
    concurrent re-save of the same prefix (which swaps in a new directory) is seen
    either entirely or not at all.

    Args:
      prefix: the checkpoint path, e.g. ``"ckpt/model.ckpt-200"``.

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
    for attempt in range(_OPEN_ATTEMPTS):
        try:
            dir_fd = os.open(prefix, os.O_RDONLY | _O_DIRECTORY)
        except FileNotFoundError:
            raise NotFoundError(f"Checkpoint {prefix} does not exist.") from None
        except NotADirectoryError:
            raise NotFoundError(
                f"{prefix} is not a trainhooks checkpoint directory (a TensorFlow "
                "checkpoint? convert it, or pass the prefix of a trainhooks save)"
            ) from None
        try:
            return _open_at(prefix, dir_fd)
        except DataLossError:
            if attempt + 1 < _OPEN_ATTEMPTS and _was_replaced(prefix, dir_fd):
                continue
            raise
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")


def _was_replaced(prefix: str, dir_fd: int) -> bool:
    opened = os.fstat(dir_fd)
    try:
        now = os.stat(prefix)
    except OSError:
        return False
    return (opened.st_dev, opened.st_ino) != (now.st_dev, now.st_ino)


def _open_file(prefix: str, dir_fd: int, name: str, what: str) -> tuple[int, int]:
    """Open ``name`` inside the checkpoint (no symlinks); returns (fd, size)."""
    where = f"Checkpoint {prefix}: {what} {name}"
    try:
        # O_NONBLOCK: a FIFO planted in place of a file must not block the open.
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise DataLossError(f"{where} is missing.") from None
    except OSError as e:  # ELOOP: a symlink
        raise DataLossError(f"{where} cannot be opened ({e}); it must be a plain file.") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DataLossError(f"{where} is not a regular file.")
    return fd, info.st_size


def _open_at(prefix: str, dir_fd: int) -> MappedCheckpoint:
    fd, size = _open_file(prefix, dir_fd, MANIFEST_NAME, "manifest")
    try:
        if size > MAX_MANIFEST_BYTES:
            raise DataLossError(f"Checkpoint {prefix}: {MANIFEST_NAME} is {size} bytes; too large.")
        with os.fdopen(os.dup(fd), "rb") as f:
            raw = f.read()
    finally:
        os.close(fd)
    manifest = decode_manifest(raw, prefix)
    ckpt = MappedCheckpoint(prefix, manifest)
    try:
        for file, entry in manifest.files.items():

            def fail(message: str, file: str = file) -> DataLossError:
                return DataLossError(f"Checkpoint {prefix}: data file {file}: {message}")

            fd, size = _open_file(prefix, dir_fd, file, "data file")
            if size != entry.size:
                os.close(fd)
                raise fail(
                    f"{size} bytes, the manifest says {entry.size}; it is "
                    f"{'truncated' if size < entry.size else 'extended'}"
                )
            mapped = ckpt.map_file(file, fd, size)
            with paused_gc():
                verify_header(mapped, size, entry, fail)
        step = int.from_bytes(ckpt.tensor_data(GLOBAL_STEP_NAME).buffer, "little", signed=True)
    except BaseException:
        ckpt.close()
        raise
    if step != manifest.global_step:
        ckpt.close()
        raise DataLossError(
            f"Checkpoint {prefix}: tensor {GLOBAL_STEP_NAME!r} holds {step}, "
            f"the manifest says {manifest.global_step}"
        )
    return ckpt
