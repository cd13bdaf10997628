"""Reading checkpoints the way ``tf.train`` does: ``load_checkpoint``, ``list_variables``, ``load_variable``.

A :class:`CheckpointReader` reads lazily: the data files are memory-mapped and a tensor
is read (and checksummed) only when asked for, so inspecting one variable of a large
checkpoint costs about that variable's size.
"""

from __future__ import annotations

import importlib
import os
from types import TracebackType
from typing import Any

import numpy as np

from trainhooks.checkpoint.format.boxes import logical_tensors
from trainhooks.checkpoint.format.dtypes import numpy_dtype
from trainhooks.checkpoint.format.manifest import MANIFEST_NAME
from trainhooks.checkpoint.format.opening import MappedCheckpoint, open_checkpoint
from trainhooks.checkpoint.state.tree_nodes import tied_aliases
from trainhooks.checkpoint.storage import storage_for
from trainhooks.checkpoint.storage.commit import is_checkpoint

__all__ = [
    "CheckpointReader",
    "checkpoint_prefix",
    "list_variables",
    "load_checkpoint",
    "load_variable",
]

# Dtypes NumPy lacks: torch's name for each, used when ml_dtypes is not installed.
_TORCH_DTYPES = {
    "BF16": "bfloat16",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
}


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


class CheckpointReader:
    """TF's ``CheckpointReader`` over a trainhooks checkpoint: tensors by name, read lazily.

    Tensors whose dtype NumPy lacks (BF16, F8_*) come back as ``ml_dtypes`` NumPy arrays
    if ``ml_dtypes`` is installed, else as torch tensors if torch is.

    Args:
      checkpoint: an opened checkpoint (see :func:`load_checkpoint`).

    Example:
        >>> reader = load_checkpoint("ckpt")  # doctest: +SKIP
        >>> reader.get_variable_to_shape_map()["global_step"]  # doctest: +SKIP
        []
        >>> reader.get_tensor("global_step")  # doctest: +SKIP
        array(200)
    """

    def __init__(self, checkpoint: MappedCheckpoint) -> None:
        self._ckpt = checkpoint
        # Tied arrays (one memory, two names) are stored once: their second names.
        stored = checkpoint.manifest.tensors
        # What a reader sees: sharded tensors whole, not their boxes (format/boxes.py).
        self._tensors = logical_tensors(checkpoint.manifest.sharded, stored)
        self._aliases = {
            name: source
            for name, source in tied_aliases(checkpoint.tree).items()
            if source in stored and name not in stored
        }

    @property
    def prefix(self) -> str:
        """The checkpoint's path."""
        return self._ckpt.prefix

    @property
    def global_step(self) -> int:
        """The global step the checkpoint was saved at."""
        return self._ckpt.global_step

    @property
    def metadata(self) -> dict[str, object]:
        """The user metadata stored with the checkpoint."""
        return self._ckpt.metadata

    def has_tensor(self, name: str) -> bool:
        """True if the checkpoint holds a tensor called ``name``."""
        return name in self._tensors or name in self._aliases

    def get_tensor(self, name: str) -> Any:
        """A new (writable) array holding tensor ``name``, checksummed before it is returned.

        Raises:
          NotFoundError: no tensor ``name``; the message lists close names.
          DataLossError: its bytes fail the checksum.
          TypeError: its dtype needs ``ml_dtypes`` or torch and neither is installed.
        """
        data = self._ckpt.tensor_data(self._aliases.get(name, name))
        try:
            dtype = numpy_dtype(data.dtype)  # BF16 and F8 through ml_dtypes, if installed
        except TypeError:
            torch = _import("torch")
            attr = _TORCH_DTYPES.get(data.dtype, "")
            if torch is None or not hasattr(torch, attr):
                raise TypeError(
                    f"Tensor {name!r} in {self.prefix} has dtype {data.dtype}, which NumPy "
                    "lacks; install ml_dtypes (pip install ml_dtypes) or torch to read it"
                ) from None
            raw = torch.frombuffer(bytearray(data.buffer), dtype=torch.uint8)
            return raw.view(getattr(torch, attr)).reshape(data.shape)
        return np.frombuffer(data.buffer, dtype=dtype).reshape(data.shape).copy()

    def get_variable_to_shape_map(self) -> dict[str, list[int]]:
        """Every tensor name mapped to its shape (a list of ints; ``[]`` for scalars)."""
        tensors = self._tensors
        shapes = {name: list(shape) for name, (_, shape) in tensors.items()}
        shapes.update({name: list(tensors[s][1]) for name, s in self._aliases.items()})
        return shapes

    def get_variable_to_dtype_map(self) -> dict[str, str]:
        """Every tensor name mapped to its dtype code (``"F32"``, ``"BF16"``, ``"I64"``, ...)."""
        tensors = self._tensors
        dtypes = {name: dtype for name, (dtype, _) in tensors.items()}
        dtypes.update({name: tensors[s][0] for name, s in self._aliases.items()})
        return dtypes

    def close(self) -> None:
        """Unmap the checkpoint's files (arrays already returned stay valid)."""
        self._ckpt.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def checkpoint_prefix(ckpt_dir_or_file: str | os.PathLike[str]) -> str:
    """The checkpoint a reader opens: a prefix as given, or a directory's latest one (TF's rule).

    Raises:
      ValueError: a directory without a state file naming an existing checkpoint, and
        without committed checkpoints.

    Example:
        >>> checkpoint_prefix("ckpt")  # doctest: +SKIP
        'ckpt/model.ckpt-200'
    """
    path = os.fspath(ckpt_dir_or_file)
    storage = storage_for(path)
    if is_checkpoint(path, storage=storage) or not storage.is_dir(path):
        return path
    entries = storage.list_dir(path)
    if MANIFEST_NAME in entries or any(e.endswith(".safetensors") for e in entries):
        return path  # a broken checkpoint directory: open_checkpoint says what is wrong
    from trainhooks.checkpoint.management.state_file import (
        latest_checkpoint,  # it imports this layer
    )

    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(
            f"Couldn't find 'checkpoint' file or checkpoints in given directory {path}"
        )
    return latest


def load_checkpoint(ckpt_dir_or_file: str | os.PathLike[str]) -> CheckpointReader:
    """Open a checkpoint for reading, like ``tf.train.load_checkpoint``.

    Args:
      ckpt_dir_or_file: a checkpoint prefix (``"ckpt/model.ckpt-200"``), or a directory
        whose state file names the latest checkpoint (``"ckpt"``).

    Returns:
      A :class:`CheckpointReader` (its manifest, file sizes and headers verified).

    Raises:
      ValueError: a directory without a state file naming an existing checkpoint.
      NotFoundError: nothing exists at the path.
      DataLossError: the checkpoint is corrupt.

    Example:
        >>> reader = load_checkpoint("ckpt")  # doctest: +SKIP
        >>> sorted(reader.get_variable_to_shape_map())  # doctest: +SKIP
        ['global_step', 'model/bias', 'model/weight']
    """
    return CheckpointReader(open_checkpoint(checkpoint_prefix(ckpt_dir_or_file)))


def list_variables(ckpt_dir_or_file: str | os.PathLike[str]) -> list[tuple[str, list[int]]]:
    """Every tensor in a checkpoint as ``(name, shape)``, sorted by name (``tf.train.list_variables``).

    Example:
        >>> list_variables("ckpt")  # doctest: +SKIP
        [('global_step', []), ('model/weight', [2, 3])]
    """
    with load_checkpoint(ckpt_dir_or_file) as reader:
        return sorted(reader.get_variable_to_shape_map().items())


def load_variable(ckpt_dir_or_file: str | os.PathLike[str], name: str) -> Any:
    """One tensor of a checkpoint as a NumPy array (``tf.train.load_variable``).

    A trailing ``":0"`` (a TF tensor name) is ignored.

    Example:
        >>> int(load_variable("ckpt", "global_step"))  # doctest: +SKIP
        200
    """
    if name.endswith(":0"):
        name = name[:-2]
    with load_checkpoint(ckpt_dir_or_file) as reader:
        return reader.get_tensor(name)
