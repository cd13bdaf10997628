"""States, sessions and flat states to save, and what a checkpoint directory holds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import pytest

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.management.state_file import get_checkpoint_state
from trainhooks.session.session import Session


class Flat(NamedTuple):  # tree.FlatState's shape
    tensors: dict[str, TensorData]
    tree: Any


# The safetensors dtype code of each NumPy dtype that has one.
CODES = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
    np.dtype(np.complex64): "C64",
}


def td(a: np.ndarray) -> TensorData:
    """``a`` as the ``TensorData`` a flat state holds (a view of its bytes)."""
    a = np.require(a, requirements="C")  # keeps 0-d arrays 0-d
    return TensorData(CODES[a.dtype], a.shape, memoryview(a.reshape(-1).view(np.uint8)))


def new_state(size: int = 3, **extra: Any) -> dict[str, Any]:
    """``{"w": zeros(size, float32), **extra}``: the state the hook tests train (w += 1)."""
    return {"w": np.zeros(size, dtype=np.float32), **extra}


def array_session(
    value: float = 1.0,
    step: int = 0,
    *,
    name: str = "v",
    size: int = 2,
    dtype: npt.DTypeLike = np.float64,
) -> Session:
    """A raw Session over one array ``[value, value + 1, ...]`` of ``size`` elements."""
    dt = np.dtype(dtype)
    return Session({name: np.arange(size, dtype=dt) + dt.type(value)}, global_step=step)


def listed_steps(checkpoint_dir: Path | str) -> list[int]:
    """The steps of the checkpoints the directory's state file lists, oldest first."""
    state = get_checkpoint_state(str(checkpoint_dir))
    assert state is not None
    return [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]


def leftovers(directory: Path) -> list[str]:
    """The temporary and set-aside directories of interrupted saves, sorted."""
    return sorted(n for n in os.listdir(directory) if ".tmp-" in n or ".old-" in n)


def flip_byte_of(prefix: str, tensor: str, where: float | None = None, *, mask: int = 0x01) -> None:
    """Flip the bits ``mask`` of one byte of ``tensor``'s bytes in its data file: the byte
    at fraction ``where`` of them (0: the first, 1: the last), or else the middle one."""
    with open_checkpoint(prefix) as ckpt:
        entry = ckpt.entry(tensor)
    path = Path(prefix) / entry.file
    raw = bytearray(path.read_bytes())
    if where is None:
        raw[(entry.start + entry.end) // 2] ^= mask
    else:
        raw[entry.start + int((entry.end - entry.start - 1) * where)] ^= mask
    path.write_bytes(bytes(raw))


def cache(prefix: str) -> None:
    """Read the checkpoint's files whole, so that the next read comes from the page cache
    (a save writes its data files with ``O_DIRECT``: they are not cached after it), and
    check that every page is resident where the OS can tell (``mincore``, on Linux).

    A machine short of memory may evict pages between the read and the check: after
    three tries the test is skipped, its premise (a cached checkpoint) not met.
    """
    for name in os.listdir(prefix):
        path = os.path.join(prefix, name)
        for _ in range(3):
            with open(path, "rb", buffering=0) as f:
                while f.read(8 * 2**20):
                    pass
            resident = _resident_fraction(path)
            if resident in (None, 1.0):
                break
        else:
            pytest.skip(f"{path}: only {resident:.0%} of it stayed cached after reading")


def _resident_fraction(path: str) -> float | None:
    """The fraction of the file's pages in the page cache; None where ``mincore`` is not
    available (not Linux) or the file is empty."""
    import ctypes
    import mmap
    import sys

    size = os.path.getsize(path)
    if not sys.platform.startswith("linux") or size == 0:
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's mincore
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        view = np.frombuffer(mapped, np.uint8)  # for the mapping's address
        failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vector)
        del view  # the mapping closes only once nothing views it
    if failed:
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(byte & 1 for byte in vector) / pages


def evict(prefix: str) -> None:
    """Drop the checkpoint's files from the page cache (written back first), so that the
    next read comes from the disk."""
    for name in os.listdir(prefix):
        fd = os.open(os.path.join(prefix, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
