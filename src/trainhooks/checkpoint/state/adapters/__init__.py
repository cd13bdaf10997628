"""State adapters: how each kind of state value becomes checkpoint data and back.

Two extension points, each a small Protocol with one implementation per file:

* :class:`ArrayAdapter` (``numpy.py``, ``torch.py``, ``dtensor.py``, ``jax.py``): a framework's arrays
  become ``TensorData`` and are restored in place (or, for immutable arrays, replaced).
* :class:`StatefulAdapter` (``torch_stateful.py``, ``stateful.py``): objects with
  ``state_dict()``/``load_state_dict()``; an adapter may check a saved state dict against
  the object before anything is loaded, so a mismatch is reported with every other one.

``checkpoint/state/tree.py`` walks the state and asks the first adapter that owns a value.
Adapters never import their framework until a value of it is seen (``sys.modules``).
"""

from __future__ import annotations

from typing import cast

from trainhooks.checkpoint.state.adapters.base import ArrayAdapter, ArraySpec, StatefulAdapter
from trainhooks.checkpoint.state.adapters.dtensor import DTensorAdapter
from trainhooks.checkpoint.state.adapters.jax import JaxAdapter
from trainhooks.checkpoint.state.adapters.numpy import NumpyAdapter
from trainhooks.checkpoint.state.adapters.stateful import GenericStatefulAdapter
from trainhooks.checkpoint.state.adapters.torch import TorchAdapter
from trainhooks.checkpoint.state.adapters.torch_stateful import ModuleAdapter, OptimizerAdapter

__all__ = [
    "ARRAY_ADAPTERS",
    "STATEFUL_ADAPTERS",
    "ArrayAdapter",
    "ArraySpec",
    "StatefulAdapter",
    "array_adapter_for",
    "array_adapter_named",
    "stateful_adapter_for",
]


# DTensorAdapter before TorchAdapter: a DTensor is a torch.Tensor too.
ARRAY_ADAPTERS: tuple[ArrayAdapter, ...] = (
    NumpyAdapter(),
    # its to_tensor_data gives LocalBoxes (one rank's regions), which write.py takes apart
    cast(ArrayAdapter, DTensorAdapter()),
    TorchAdapter(),
    JaxAdapter(),
)
STATEFUL_ADAPTERS: tuple[StatefulAdapter, ...] = (
    ModuleAdapter(),
    OptimizerAdapter(),
    GenericStatefulAdapter(),
)


# Whether a value is an array, and of which framework, depends only on its type.
_BY_TYPE: dict[type, ArrayAdapter | None] = {}


def array_adapter_for(value: object) -> ArrayAdapter | None:
    """The adapter whose framework ``value`` is an array of, or None."""
    cls = type(value)
    try:
        return _BY_TYPE[cls]
    except KeyError:
        pass
    found = next((a for a in ARRAY_ADAPTERS if a.owns(value)), None)
    _BY_TYPE[cls] = found
    return found


def array_adapter_named(framework: str) -> ArrayAdapter:
    """The adapter recorded in a tree as ``framework``."""
    for adapter in ARRAY_ADAPTERS:
        if adapter.framework == framework:
            return adapter
    raise ValueError(f"The checkpoint holds {framework!r} arrays, which this version cannot read.")


def stateful_adapter_for(value: object) -> StatefulAdapter | None:
    """The adapter for an object with ``state_dict()``/``load_state_dict()``, or None."""
    for adapter in STATEFUL_ADAPTERS:
        if adapter.owns(value):
            return adapter
    return None
