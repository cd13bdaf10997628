"""``PerRank``: a state entry whose value differs on each rank of a torch.distributed job.

A checkpoint of a job holds one copy of the state: the replicas of a DDP model are the
same on every rank, so any rank's copy will do. Some values are not replicas: each
rank's random number generators (dropout masks, augmentation), its position in its
shard of the data. Saved as replicated values, one rank's would be restored on every
rank, and a resumed job would draw other numbers than one that ran through.

``PerRank(value)`` saves every rank's value and restores each rank's to it. At each
save the ranks exchange their values (a JSON all-gather on a gloo group of its own, no
pickle), so every rank flattens the same state ``{"rank0": ..., "rank1": ...}`` and
the save's plan stays the same on every rank; a restore gives each rank
``state["rank<r>"]``. The values should therefore be small (RNG states, counters,
positions: kilobytes); the arrays among them travel base64-encoded.

Outside a job it is the value of rank 0 of a job of one, so a checkpoint of one
process restores into a one-process run and the other way round.
"""

from __future__ import annotations

import base64
import math
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from trainhooks.checkpoint.distributed.torch_group import DEFAULT_TIMEOUT_SECS, TorchProcessGroup

__all__ = ["PerRank"]


class PerRank:
    """A state entry saved for every rank of a job and restored to each rank's own.

    Args:
      value: an object with ``state_dict()``/``load_state_dict()`` holding this rank's
        values, e.g. :class:`~trainhooks.RNGState`; its state dict may hold NumPy
        arrays, CPU torch tensors, numbers, strings, None, and lists and dicts of them.
      timeout_secs: how long the exchange at a save waits for the slowest rank.

    Raises:
      TypeError: ``value`` has no ``state_dict()``/``load_state_dict()``.

    Example:
        >>> import numpy as np
        >>> import trainhooks as th
        >>> rng = np.random.default_rng(7)
        >>> entry = th.PerRank(th.RNGState({"data": rng}))
        >>> saved = entry.state_dict()            # one process: rank 0 of a job of one
        >>> sorted(saved)
        ['rank0']
        >>> a = rng.random()
        >>> entry.load_state_dict(saved)
        >>> rng.random() == a
        True
    """

    def __init__(self, value: Any, *, timeout_secs: float = DEFAULT_TIMEOUT_SECS) -> None:
        if not (
            callable(getattr(value, "state_dict", None))
            and callable(getattr(value, "load_state_dict", None))
        ):
            raise TypeError(
                f"PerRank needs an object with state_dict() and load_state_dict(), got "
                f"{type(value).__name__}: wrap it, e.g. PerRank(th.RNGState())."
            )
        self.value = value
        self._timeout_secs = float(timeout_secs)
        self._group: TorchProcessGroup | None = None

    def state_dict(self) -> dict[str, Any]:
        """Every rank's values, ``{"rank<r>": state dict}``; a collective in a job."""
        mine = _encode(self.value.state_dict())
        group = self._job_group()
        values = group.all_gather(mine) if group is not None else [mine]
        return {f"rank{rank}": _decode(v) for rank, v in enumerate(values)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore this rank's values from ``state_dict["rank<r>"]``.

        Raises:
          ValueError: the checkpoint holds no values for this rank (saved by a job of
            fewer ranks).
        """
        rank = _rank()
        key = f"rank{rank}"
        if key not in state_dict:
            raise ValueError(
                f"This PerRank entry was saved by a job of {len(state_dict)} rank(s) and "
                f"holds nothing for rank {rank}: restore it into a job of the same size, or "
                "leave the entry out of the state (strict_restore=False keeps it as is)."
            )
        self.value.load_state_dict(state_dict[key])

    def _job_group(self) -> TorchProcessGroup | None:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not dist.is_available() or not dist.is_initialized():
            return None
        if dist.get_world_size() == 1:
            return None
        if self._group is None:  # every rank gets here at the same save
            self._group = TorchProcessGroup(self._timeout_secs)
        return self._group

    def __repr__(self) -> str:
        return f"PerRank({self.value!r})"


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return int(dist.get_rank())


_TAGS = frozenset({"__array__", "__tensor__", "__scalar__", "__tuple__", "__dict__", "__float__"})


def _encode(value: Any) -> Any:
    """A state dict as JSON values that :func:`_decode` turns back into the same types:
    arrays, tensors and NumPy scalars (dtype and shape kept), tuples, dicts of any keys,
    non-finite floats."""
    if isinstance(value, np.ndarray):
        return {"__array__": _array(value)}
    if type(value).__module__ == "torch" and type(value).__name__ in ("Tensor", "Parameter"):
        return {"__tensor__": _tensor(value)}
    if isinstance(value, np.generic):
        return {"__scalar__": _array(np.asarray(value))}
    if isinstance(value, Mapping):
        if all(type(k) is str and k not in _TAGS for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"__float__": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"A PerRank value's state dict holds a {type(value).__name__}; it may hold arrays, "
        "CPU tensors, numbers, strings, None, and tuples, lists and dicts of them."
    )


def _array(a: np.ndarray) -> list[Any]:
    if a.dtype.hasobject:
        raise TypeError(
            "A PerRank value's state dict holds a NumPy array of Python objects; it may hold "
            "arrays of numbers and booleans only."
        )
    shape = list(a.shape)
    data = np.ascontiguousarray(a).tobytes()
    return [a.dtype.str, shape, base64.b64encode(data).decode("ascii")]


def _from_array(spec: list[Any]) -> np.ndarray:
    dtype, shape, data = spec
    return np.frombuffer(base64.b64decode(data), dtype=np.dtype(dtype)).reshape(shape).copy()


def _tensor(t: Any) -> list[Any]:
    """A tensor's dtype name, shape and raw bytes (any dtype, bfloat16 included)."""
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    dtype = str(t.dtype).removeprefix("torch.")
    return [dtype, list(t.shape), base64.b64encode(data).decode("ascii")]


def _from_tensor(spec: list[Any]) -> Any:
    import torch

    name, shape, data = spec
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"a PerRank value names an unknown torch dtype {name!r}")
    raw = base64.b64decode(data)
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, inner),) = value.items()
            if tag == "__array__":
                return _from_array(inner)
            if tag == "__tensor__":
                return _from_tensor(inner)
            if tag == "__scalar__":
                return _from_array(inner)[()]
            if tag == "__tuple__":
                return tuple(_decode(v) for v in inner)
            if tag == "__dict__":
                return {_decode(k): _decode(v) for k, v in inner}
            if tag == "__float__":
                return float(inner)
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
