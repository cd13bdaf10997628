"""Restoring sharded tensors: each rank reads only the region its DTensors hold.

``restore.py`` asks :class:`ShardedRestore` before it restores a state:

1. Which DTensors the state holds, by tensor name (a walk like the save's). A fresh
   optimizer of DTensor parameters has no moments yet to restore into; as torch's own
   checkpointing does, it takes one step of zero gradients at learning rate 0 (which
   changes no parameter) so that its moments exist, sharded like their parameters,
   when the checkpoint holds optimizer state for it. A restore that then fails
   (a checksum, a mismatch) takes those moments back (:meth:`ShardedRestore.undo`): the
   optimizer is left as it was, without state, not with zero moments and a step count.
2. For each of them, the region of the global tensor this rank holds on the restoring
   job's mesh (``adapters.dtensor.local_box``), read from the saved boxes that overlap
   it, each checksummed as it is read (``format/sharded_read.py``). The saving job's
   mesh does not matter: a whole tensor is a single box, so a checkpoint of one
   process restores into a sharded job and the other way round.
3. Which data files hold no box: the restore checksums them in full before anything is
   written, as it always does; the boxes are checksummed when read.

The region goes to the restore as an ``adapters.dtensor.LocalPiece``: the checked bytes
of the saved boxes that overlap it, which the DTensor adapter copies into the DTensor's
local tensor in place (one copy) once everything was checked.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from trainhooks.checkpoint.format.boxes import box_tensor_name, logical_tensors
from trainhooks.checkpoint.format.dtypes import storage_spec, torch_dtype_code
from trainhooks.checkpoint.format.mapped_checkpoint import MappedCheckpoint
from trainhooks.checkpoint.format.sharded_read import region_parts, stored_spec
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state import tree
from trainhooks.checkpoint.state.adapters.dtensor import LocalPiece, is_dtensor, local_box

__all__ = ["ShardedRestore", "init_optimizer_state"]

_NOTHING = TensorData("U8", (0,), memoryview(b""))


class ShardedRestore:
    """The sharded part of restoring ``ckpt`` into ``state`` (see the module docstring).

    Args:
      ckpt: the opened checkpoint.
      state: the state about to be restored (its optimizers may be given their moments).

    Example:
        >>> plan = ShardedRestore(ckpt, state)  # doctest: +SKIP
        >>> ckpt.verify(files=plan.verify_files)  # doctest: +SKIP
        >>> piece = plan.piece("model/fc.weight")  # doctest: +SKIP
    """

    def __init__(self, ckpt: MappedCheckpoint, state: Mapping[str, Any]) -> None:
        self.ckpt = ckpt
        self.targets: dict[str, Any] = {}
        self._given_state: list[Any] = []  # fresh optimizers given their moments here
        sharded = ckpt.manifest.sharded
        box_files = {
            ckpt.manifest.tensors[box_tensor_name(name, box)].file
            for name, entry in sharded.items()
            for box in entry.boxes
        }
        #: the data files to checksum in full (None: all of them)
        self.verify_files: set[str] | None = (
            set(ckpt.manifest.files) - box_files if box_files else None
        )
        if "torch.distributed.tensor" not in sys.modules:
            return  # no DTensor can exist
        names = logical_tensors(sharded, ckpt.manifest.tensors)
        for entry, value in state.items():
            fresh = _has_dtensor_params(value) and not value.state
            if fresh and any(n.startswith(f"{entry}/state/") for n in names):
                init_optimizer_state(value)
                self._given_state.append(value)
        self.targets = _dtensors_in(state)

    def undo(self) -> None:
        """Take back the state given to fresh optimizers (the restore failed): they are
        fresh again. Their parameters were not changed (a step at learning rate 0)."""
        for optimizer in self._given_state:
            optimizer.state.clear()
        self._given_state = []

    def piece(self, name: str) -> LocalPiece | None:
        """This rank's region of tensor ``name`` for the DTensor restored from it; None
        when ``name`` is no DTensor of the state, or the saved tensor is not of its
        global shape (the restore then reports the mismatch)."""
        target = self.targets.get(name)
        if target is None:
            return None
        found = stored_spec(self.ckpt, name)
        code = torch_dtype_code(target.dtype)
        if found is None or found != storage_spec(code, tuple(int(n) for n in target.shape)):
            return None
        _, region, parts = region_parts(self.ckpt, name, local_box(target))
        return LocalPiece(found[0], found[1], region, parts, target)


def _dtensors_in(state: Mapping[str, Any]) -> dict[str, Any]:
    """Every DTensor of ``state`` by tensor name (objects' state dicts included)."""
    found: dict[str, Any] = {}

    def record(name: str, value: Any) -> TensorData:
        if is_dtensor(value):
            found[name] = value
        return _NOTHING  # nothing is copied: only the names are wanted

    try:
        tree.flatten_state(state, host_copy=record)
    except (TypeError, ValueError):
        return {}  # the restore itself reports what is wrong with the state
    return found


def _has_dtensor_params(value: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(value, torch.optim.Optimizer):
        return False
    return any(is_dtensor(p) for g in value.param_groups for p in g["params"])


def init_optimizer_state(optimizer: Any) -> None:
    """Give a fresh ``optimizer`` its state (moments shaped and sharded like its
    parameters) with one step of zero gradients at learning rate 0; parameters, learning
    rates and gradients are as before, and the state is then overwritten by the restore.

    Raises:
      ValueError: a parameter already has a gradient (the step would use it).
    """
    import torch

    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        raise ValueError(
            "restoring the state of an optimizer of DTensor parameters needs its moments, "
            "made by one step of zero gradients: call optimizer.zero_grad(set_to_none=True) "
            "before the restore"
        )
    lrs = [g.get("lr") for g in optimizer.param_groups]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for g in optimizer.param_groups:
            if "lr" in g:
                g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p in params:
            p.grad = None
