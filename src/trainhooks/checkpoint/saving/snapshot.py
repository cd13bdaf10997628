"""``SnapshotPool``: a consistent host copy of a state, in buffers reused from save to save.

A background save may only return to the training loop once what it will write can
no longer change. :meth:`SnapshotPool.take` flattens the state and copies every array
into a host buffer the pool owns; the loop may then update its tensors in place while
the copy is written elsewhere.

Buffers are keyed by tensor name, dtype and shape and reused by the next snapshot, so
a steady training run allocates (and page-faults) its snapshot memory once, on the
first save. Reuse is safe because a pool serves one save at a time: the ``Saver``
waits for the save in flight before it takes the next snapshot.

Copies use ``np.copyto``, which releases the GIL. Tensors on an accelerator are already
copied to fresh host memory by ``tree.flatten_state``; the pool keeps those copies
instead of copying them a second time. With ``torch.cuda`` available,
:meth:`SnapshotPool.copy_leaf` copies a CUDA tensor into a reused pinned buffer with a
non-blocking copy and :meth:`SnapshotPool.synchronize` waits once for all of them; it
is the per-leaf callback for a flatten that hands leaves to the pool (see
``docs/internals.md``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state import tree
from trainhooks.checkpoint.state.adapters.dtensor import is_dtensor

__all__ = ["SnapshotPool"]

_Key = tuple[str, tuple[int, ...]]


class SnapshotPool:
    """Reusable host buffers holding a consistent copy of a state's tensors.

    Example:
        >>> import numpy as np
        >>> pool = SnapshotPool()
        >>> w = np.zeros(3, np.float32)
        >>> flat = pool.take({"w": w})
        >>> w += 1  # training goes on; the snapshot keeps the saved values
        >>> np.frombuffer(flat.tensors["w"].buffer, np.float32)
        array([0., 0., 0.], dtype=float32)
    """

    def __init__(self) -> None:
        self._host: dict[str, tuple[_Key, np.ndarray[Any, Any]]] = {}
        self._pinned: dict[str, tuple[_Key, Any]] = {}
        self._pending_device_copies = False

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's buffers."""
        host = sum(buf.nbytes for _, buf in self._host.values())
        pinned = sum(buf.numel() * buf.element_size() for _, buf in self._pinned.values())
        return host + pinned

    def take(self, state: Mapping[str, Any]) -> tree.FlatState:
        """Flatten ``state`` and copy every tensor into the pool's buffers.

        The result never aliases the state: the caller may modify the state as soon as
        this returns. It does alias the pool, so it is valid until the next ``take``.

        Args:
          state: the training state (``docs/format.md``).

        Returns:
          A ``FlatState`` over the pool's buffers, for ``format.write_checkpoint``.

        Raises:
          TypeError, ValueError: as ``tree.flatten_state`` for a state it cannot save.
        """
        flat = tree.flatten_state(state, copy=True, host_copy=self.copy_leaf)
        self.synchronize()
        for name in set(self._host) - set(flat.tensors):  # entries the state no longer has
            del self._host[name]
        for name in set(self._pinned) - set(flat.tensors):
            del self._pinned[name]
        return flat

    def copy_leaf(self, name: str, value: Any) -> TensorData | None:
        """Copy one array leaf into the pool: the per-leaf form of :meth:`take`.

        CUDA tensors go to a reused pinned buffer with a non-blocking copy (call
        :meth:`synchronize` once after the last leaf); host arrays are copied at once.

        Args:
          name: the tensor's name in the flattened state.
          value: a torch tensor or NumPy array.

        Returns:
          The copy as ``TensorData``, or None for a value this pool does not copy (the
          caller then flattens it with ``copy=True``).
        """
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(value, torch.Tensor):
            if is_dtensor(value):
                return None  # its own boxes, copied by its adapter (adapters/dtensor.py)
            if value.device.type == "cuda":
                return self._copy_cuda(name, value)
            if value.device.type != "cpu":
                return None
            from trainhooks.checkpoint.format import dtypes

            # Through torch's own byte view: .numpy() refuses bfloat16 and float8.
            return self._copy_bytes(name, dtypes.torch_to_tensor_data(value))
        if not isinstance(value, np.ndarray):
            return None
        from trainhooks.checkpoint.format import dtypes

        return self._copy_bytes(name, dtypes.numpy_to_tensor_data(value))

    def synchronize(self) -> None:
        """Wait for the non-blocking device copies issued by :meth:`copy_leaf`."""
        if self._pending_device_copies:
            import torch

            torch.cuda.synchronize()
            self._pending_device_copies = False

    def clear(self) -> None:
        """Release every buffer (the next snapshot allocates again)."""
        self.synchronize()
        self._host.clear()
        self._pinned.clear()

    def _copy_bytes(self, name: str, data: TensorData) -> TensorData:
        key = (data.dtype, data.shape)
        entry = self._host.get(name)
        if entry is None or entry[0] != key:
            entry = (key, np.empty(data.nbytes, np.uint8))
            self._host[name] = entry
        buf = entry[1]
        np.copyto(buf, np.frombuffer(data.buffer, np.uint8))  # releases the GIL
        return TensorData(data.dtype, data.shape, buf.data)

    def _copy_cuda(self, name: str, value: Any) -> TensorData:
        import torch

        from trainhooks.checkpoint.format import dtypes

        source = value.detach().resolve_conj().resolve_neg()
        key = (str(source.dtype), tuple(int(n) for n in source.shape))
        entry = self._pinned.get(name)
        if entry is None or entry[0] != key:
            pinned = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            entry = (key, pinned)
            self._pinned[name] = entry
        entry[1].copy_(source, non_blocking=True)
        self._pending_device_copies = True
        return dtypes.torch_to_tensor_data(entry[1], copy=False)
