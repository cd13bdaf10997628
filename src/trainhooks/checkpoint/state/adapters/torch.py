"""PyTorch tensors as state values.

Tensors are restored in place (parameters keep their identity, ``requires_grad`` and
device); tensors on an accelerator are copied to host memory when flattened and back
when restored. Only the strided layout is supported.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Hashable
from typing import Any

import numpy as np

from trainhooks.checkpoint.format import dtypes
from trainhooks.checkpoint.format.tensor import DTYPE_ITEMSIZE, TensorData
from trainhooks.checkpoint.state.adapters.base import ArraySpec

__all__ = ["TorchAdapter"]

logger = logging.getLogger(__name__)


#: Why a ShardedTensor (what FSDP1's sharded state dicts hold) is refused, and what to
#: pass instead; a ShardedTensor answers few tensor methods, so it is caught first.
SHARDED_TENSOR_PROBLEM = (
    "is a ShardedTensor (FSDP1's sharded state dict), which trainhooks does not checkpoint: "
    "shard the model with FSDP2 (torch.distributed.fsdp.fully_shard), whose parameters and "
    "optimizer state are DTensors that every rank saves its part of; or give FSDP1 a "
    "device_mesh= so that its sharded state dicts hold DTensors; or checkpoint a full state "
    "dict (FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT), or get_state_dict("
    "model, optimizer, options=StateDictOptions(full_state_dict=True)) from "
    "torch.distributed.checkpoint.state_dict)"
)


def _is_sharded_tensor(value: object) -> bool:
    module = sys.modules.get("torch.distributed._shard.sharded_tensor.api")
    return module is not None and isinstance(value, module.ShardedTensor)


def _device_copy(target: Any, data: TensorData) -> bool:
    """Copy ``data`` (checked bytes in host memory: the checkpoint's mapping) straight into
    the accelerator tensor ``target``; False (nothing done) where it cannot.

    The host bytes are wrapped as a CPU tensor without a copy and ``copy_`` moves them to
    the device: no second host copy, no host tensor allocated per restore.
    """
    import warnings

    import torch

    if data.dtype not in DTYPE_ITEMSIZE or target.is_conj() or target.is_neg():
        return False
    buffer = data.buffer
    if buffer.nbytes != target.numel() * target.element_size():
        return False
    if not buffer.nbytes:
        return True
    with warnings.catch_warnings():
        # The mapping is read-only; the wrapper is only ever read from (copy_'s source).
        warnings.simplefilter("ignore", UserWarning)
        host = torch.frombuffer(buffer, dtype=torch.uint8)
    source = host.view(target.dtype).reshape(target.shape)
    with torch.no_grad():
        target.copy_(source)  # pageable host memory: returns once the copy is done
    return True


class TorchAdapter:
    """:class:`~trainhooks.checkpoint.state.adapters.base.ArrayAdapter` for ``torch.Tensor``."""

    framework = "torch"

    def owns(self, value: object) -> bool:
        torch = sys.modules.get("torch")  # not imported: cannot be a tensor
        return torch is not None and isinstance(value, torch.Tensor)

    def spec(self, value: Any) -> ArraySpec:
        import torch

        if _is_sharded_tensor(value):
            raise TypeError(SHARDED_TENSOR_PROBLEM)
        if value.layout != torch.strided or value.is_nested:
            raise TypeError(
                f"a tensor with layout {value.layout} cannot be checkpointed: pass "
                "tensor.to_dense() (and restore into a dense tensor)"
            )
        if value.device.type == "meta":
            raise TypeError(
                "a tensor on the meta device has no data: materialize it first "
                "(e.g. module.to_empty(device='cpu'))"
            )
        code = dtypes.torch_dtype_code(value.dtype)
        return ArraySpec(code, tuple(int(n) for n in value.shape), device=str(value.device))

    def to_tensor_data(self, value: Any, *, copy: bool) -> TensorData:
        if (
            not copy
            and value.is_cpu
            and value.is_contiguous()
            and not value.is_conj()
            and not value.is_neg()
            and value.dim()
        ):
            code = dtypes.torch_dtype_code(value.dtype)
            if code in DTYPE_ITEMSIZE:
                try:  # zero-copy: the tensor's own memory, as bytes
                    array = value.detach().numpy()
                    return TensorData(code, tuple(value.shape), array.data.cast("B"))
                except (TypeError, ValueError, RuntimeError):  # bfloat16, float8: no NumPy type
                    pass
        return dtypes.torch_to_tensor_data(value, copy=copy)

    def identity(self, value: Any) -> Hashable | None:
        # One memory seen one way: a parameter and the detached tensor a state_dict()
        # holds for it, or the one parameter of tied weights under both of its names.
        try:
            if not value.numel():
                return None  # empty tensors may share any address
            return (
                value.device,
                value.data_ptr(),
                value.dtype,
                tuple(value.shape),
                value.stride(),
                value.is_conj(),
                value.is_neg(),
            )
        except (RuntimeError, NotImplementedError):  # a tensor without plain storage
            return None

    def writable_problem(self, value: Any) -> str | None:
        if value.is_inference():
            return (
                "is an inference tensor (made under torch.inference_mode) and cannot be "
                "restored in place: pass tensor.clone() made outside inference mode"
            )
        return None

    def restore(self, target: Any, data: TensorData, spec: ArraySpec) -> Any:
        if target.device.type != "cpu" and _device_copy(target, data):
            return target
        dtypes.copy_into_torch(target, data)
        return target

    def host_view(self, target: Any) -> np.ndarray[Any, Any] | None:
        if (
            target.device.type == "cpu"
            and target.is_contiguous()
            and not target.is_conj()
            and not target.is_neg()
            and dtypes.torch_dtype_code(target.dtype) in DTYPE_ITEMSIZE
        ):
            return dtypes.host_bytes(target)
        return None

    def build(self, data: TensorData, spec: ArraySpec) -> Any:
        import torch

        tensor = dtypes.tensor_data_to_torch(data, dtypes.torch_dtype(spec.dtype), spec.shape)
        if spec.device is None or torch.device(spec.device).type == "cpu":
            return tensor
        try:
            return tensor.to(spec.device)
        except (RuntimeError, AssertionError) as e:  # device absent on this machine
            logger.warning("Restoring a tensor saved on %s to the CPU: %s", spec.device, e)
            return tensor
