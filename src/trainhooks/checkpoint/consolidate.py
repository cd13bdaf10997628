"""``consolidate``: a checkpoint, sharded or not, as one standard safetensors file of
whole tensors, for export (Hugging Face, any safetensors reader).

The file is written streaming: the header first (every tensor's name, dtype, shape and
place is known from the manifest), then each tensor in turn, read (and checksummed)
from the checkpoint and written out before the next is read. A tensor stored whole is
written straight from the checkpoint's mapping; a sharded one is put together from its
boxes in new memory, so at most one tensor's worth of memory is held at a time. The
file appears complete or not at all (written beside its path, fsynced, renamed).
"""

from __future__ import annotations

import math
import os

from trainhooks.checkpoint.format.boxes import logical_tensors
from trainhooks.checkpoint.format.datafile import encode_header
from trainhooks.checkpoint.format.manifest import GLOBAL_STEP_NAME
from trainhooks.checkpoint.format.opening import MappedCheckpoint, open_checkpoint
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE
from trainhooks.checkpoint.reader import checkpoint_prefix

__all__ = ["consolidate"]


def consolidate(
    ckpt_dir_or_file: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    entry: str | None = None,
) -> list[str]:
    """Write every tensor of a checkpoint, whole, into the safetensors file ``out_path``.

    Args:
      ckpt_dir_or_file: a checkpoint, or a directory of them for its latest.
      out_path: the ``.safetensors`` file to write (replaced if it exists).
      entry: only the tensors of this top-level state entry (e.g. ``"model"``), named
        without its prefix (``"fc.weight"``, as the module's ``state_dict()`` names them).
        By default every tensor but the global step, under its full name.

    Returns:
      The names written, in file order.

    Raises:
      ValueError: ``entry`` holds no tensor.
      DataLossError: a tensor read fails its checksum; nothing is left at ``out_path``.

    Example:
        >>> consolidate("ckpt", "model.safetensors", entry="model")  # doctest: +SKIP
        ['fc.weight', 'fc.bias']
    """
    prefix = checkpoint_prefix(ckpt_dir_or_file)
    out = os.fspath(out_path)
    with open_checkpoint(prefix) as ckpt:
        found = logical_tensors(ckpt.manifest.sharded, ckpt.manifest.tensors)
        found.pop(GLOBAL_STEP_NAME, None)
        if entry is not None:
            start = f"{entry}/"
            found = {n: v for n, v in found.items() if n.startswith(start)}
            if not found:
                raise ValueError(f"Checkpoint {prefix} holds no tensor under {entry!r}/")
        # largest items first: every tensor stays aligned to its item size
        names = sorted(found, key=lambda n: (-DTYPE_ITEMSIZE[found[n][0]], n))
        out_names = [n[len(entry) + 1 :] if entry is not None else n for n in names]
        codes = [found[n][0] for n in names]
        shapes = [found[n][1] for n in names]
        sizes = [DTYPE_ITEMSIZE[c] * math.prod(s) for c, s in zip(codes, shapes)]
        header = encode_header(out_names, codes, shapes, sizes)
        _write(out, header, names, ckpt)
    return out_names


def _write(out: str, header: bytes, names: list[str], ckpt: MappedCheckpoint) -> None:
    temporary = f"{out}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(header)
            for name in names:
                data = ckpt.tensor_data(name)
                f.write(data.buffer)
                del data  # the next tensor is read only once this one is written
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, out)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
