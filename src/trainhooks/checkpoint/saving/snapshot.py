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
:meth:`SnapshotPool.copy_leaf` assigns a CUDA tensor a reused pinned buffer; once the
walk over the state is done (a ``state_dict()`` may queue kernels that compute the
tensors it returns), the copies are issued, non-blocking, on a side stream of the
pool's (one per device) that first waits for everything queued on the current stream,
and the current stream is made to wait for an event recorded after them, so the
kernels the loop queues next (an optimizer step updating parameters in place) cannot
change a tensor before it is copied. ``take(state, wait=False)`` returns without
blocking the host on the copies: the background writer calls
:meth:`SnapshotPool.synchronize` before it reads the buffers. Work the user queues on
streams of their own is theirs to order (``docs/internals.md``).
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
        self._streams: dict[Any, Any] = {}  # device -> the pool's side stream on it
        # device -> (source, pinned buffer): the copies to issue once the walk is done
        self._queued: dict[Any, list[tuple[Any, Any]]] = {}
        self._copies_done: list[tuple[Any, Any]] = []  # (device, event) per device

    @property
    def nbytes(self) -> int:
        """Bytes held by the pool's buffers."""
        host = sum(buf.nbytes for _, buf in self._host.values())
        pinned = sum(buf.numel() * buf.element_size() for _, buf in self._pinned.values())
        return host + pinned

    def take(self, state: Mapping[str, Any], *, wait: bool = True) -> tree.FlatState:
        """Flatten ``state`` and copy every tensor into the pool's buffers.

        The result never aliases the state: the caller may modify the state as soon as
        this returns (CUDA tensors through the current stream, which waits for the
        copies). It does alias the pool, so it is valid until the next ``take``.

        Args:
          state: the training state (``docs/format.md``).
          wait: block until the device-to-host copies have landed. False returns as soon
            as they are queued; call :meth:`synchronize` before reading the buffers.

        Returns:
          A ``FlatState`` over the pool's buffers, for ``format.write_checkpoint``.

        Raises:
          TypeError, ValueError: as ``tree.flatten_state`` for a state it cannot save.
        """
        self.synchronize()  # the previous snapshot's copies, should a caller not have
        try:
            flat = tree.flatten_state(state, copy=True, host_copy=self.copy_leaf)
        except BaseException:
            self._queued = {}  # nothing of a snapshot that failed is copied
            raise
        self._order_after_copies()
        if wait:
            self.synchronize()
        for name in set(self._host) - set(flat.tensors):  # entries the state no longer has
            del self._host[name]
        for name in set(self._pinned) - set(flat.tensors):
            del self._pinned[name]
        return flat

    def copy_leaf(self, name: str, value: Any) -> TensorData | None:
        """Copy one array leaf into the pool: the per-leaf form of :meth:`take`.

        CUDA tensors are given a reused pinned buffer, copied into by a non-blocking copy
        on the pool's side stream once the walk is done (:meth:`take`; call
        :meth:`synchronize` after the last leaf, before reading the buffers); host arrays
        are copied at once.

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
        """Wait until the device-to-host copies of the last :meth:`take` (or the
        :meth:`copy_leaf` calls since) have landed."""
        self._order_after_copies()
        done, self._copies_done = self._copies_done, []
        if not done:
            return
        import torch

        for device, event in done:
            # A new thread's current device is 0: without the guard, the background
            # writer's first CUDA call would create a context on GPU 0.
            with torch.cuda.device(device):
                event.synchronize()

    def _order_after_copies(self) -> None:
        """Issue the queued copies on each device's side stream, after everything the
        current stream holds (the step's kernels, a ``state_dict()``'s), and make the
        current stream wait for them: what the loop queues next runs after the copy."""
        if not self._queued:
            return
        import torch

        queued, self._queued = self._queued, {}
        for device, pairs in queued.items():
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device)
            current = torch.cuda.current_stream(device)
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                for source, pinned in pairs:
                    pinned.copy_(source, non_blocking=True)
                    # The caching allocator must not hand the source's memory to the
                    # current stream (a temporary freed by the loop) before it is read.
                    source.record_stream(stream)
            event = torch.cuda.Event(blocking=True)  # a waiting writer sleeps, not spins
            event.record(stream)
            current.wait_event(event)
            self._copies_done.append((device, event))

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

        # Resolving queues a kernel on the current stream; the side stream waits for it.
        source = value.detach().resolve_conj().resolve_neg()
        key = (str(source.dtype), tuple(int(n) for n in source.shape))
        entry = self._pinned.get(name)
        if entry is None or entry[0] != key:
            pinned = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)
            entry = (key, pinned)
            self._pinned[name] = entry
        self._queued.setdefault(source.device, []).append((source, entry[1]))
        return dtypes.torch_to_tensor_data(entry[1], copy=False)
