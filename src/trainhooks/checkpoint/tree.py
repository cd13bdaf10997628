"""The training state as named tensors plus a JSON tree, and back into the user's objects.

:func:`flatten_state` turns a state (DESIGN §2) into :class:`FlatState`: every array
becomes a named :class:`~trainhooks.checkpoint.tensor.TensorData` (names are ``/``-joined
paths, ``"model/fc.weight"``, ``"optimizer/state/0/exp_avg"``) and ``tree`` records how
the names nest, the adapters used and every other value as JSON. :func:`restore_state`
checks a checkpoint against the state and only then writes it back in place.

Tree nodes are JSON objects tagged by ``"type"``:

* ``tensor``: ``framework``, ``name``, logical ``dtype`` (see ``dtypes.py``), ``shape``,
  optional ``device`` and ``scalar``;
* ``object``: an object's ``state_dict()`` under ``state`` (``class`` for the reader,
  ``metadata`` for a torch state dict's ``_metadata``);
* ``dict`` (``items``: ``[key, node]`` pairs, a non-str key as its value node), ``list``,
  ``tuple`` (``items``: nodes);
* Python values: ``none``, ``bool``, ``int``, ``float``, ``str``, ``bytes``
  (``adapters/python.py``).

Matching on restore: arrays and objects must be where the state has them; dict keys must
match; a list or tuple holding only Python values, like a Python value, is replaced by the
saved one (its length may differ), while one holding arrays or objects is matched item by
item.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from trainhooks import errors
from trainhooks.checkpoint.adapters import array_adapter_for, stateful_adapter_for
from trainhooks.checkpoint.adapters import python as pyvalues
from trainhooks.checkpoint.tensor import TensorData
from trainhooks.checkpoint.tree_restore import SUPPORTED, Mismatch, Restorer, pure

__all__ = [
    "RESERVED_NAMES",
    "TREE_VERSION",
    "FlatState",
    "Mismatch",
    "StateMismatchError",
    "check_state",
    "flatten_state",
    "restore_state",
]

logger = logging.getLogger(__name__)

TREE_VERSION = 1
#: top-level state keys the format uses itself.
RESERVED_NAMES = frozenset({"global_step"})


class FlatState(NamedTuple):
    """A state as the format writes it: named tensors and the JSON tree that nests them.

    Buffers alias the state's arrays where possible (see :func:`flatten_state`).
    """

    tensors: dict[str, TensorData]
    tree: dict[str, Any]


class StateMismatchError(errors.Error, ValueError):
    """A checkpoint does not fit the state; ``problems`` lists every mismatch. Nothing was restored."""

    def __init__(self, problems: list[Mismatch]) -> None:
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(
            f"The checkpoint does not match the state ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}); nothing was restored:\n{lines}\n"
            "Build the state as it was saved, or pass strict=False to restore what matches."
        )
        self.problems = problems


def flatten_state(state: Mapping[str, Any], *, copy: bool = False) -> FlatState:
    """Split ``state`` into named tensors and a JSON tree.

    Args:
      state: the training state: a mapping of names to values (DESIGN §2).
      copy: when False (the default), the buffers of contiguous host arrays alias their
        memory: write them out before the state changes (the next step). Pass True for a
        snapshot the training loop may run on from (background saving); arrays that
        must be copied anyway (accelerator tensors, strided views) are copied only once.

    Returns:
      A :class:`FlatState`; its ``tree`` is JSON-serialisable.

    Raises:
      TypeError: a value has an unsupported type (the message names its path).
      ValueError: a reserved name (``"global_step"``) or two values with the same name.

    Example:
        >>> import numpy as np
        >>> flat = flatten_state({"w": np.zeros(3, np.float32), "epoch": 2})
        >>> sorted(flat.tensors), flat.tensors["w"].dtype
        (['w'], 'F32')
    """
    flattener = _Flattener(collect=True, copy=copy)
    root = flattener.root(state)
    tree = {"version": TREE_VERSION, "frameworks": sorted(flattener.frameworks), "root": root}
    return FlatState(flattener.tensors, tree)


def check_state(state: Mapping[str, Any]) -> None:
    """Raise if ``state`` could not be checkpointed; copies no array data.

    Objects' ``state_dict()`` is called (cheap for torch: it returns references).

    Raises:
      TypeError: a value has an unsupported type, naming its path.
      ValueError: a reserved name or two values with the same tensor name.

    Example:
        >>> check_state({"fn": print})
        Traceback (most recent call last):
        ...
        TypeError: state['fn'] has unsupported type builtin_function_or_method: pass ...
    """
    _Flattener(collect=False, copy=False).root(state)


def restore_state(
    state: dict[str, Any],
    tree: Mapping[str, Any],
    get_tensor: Callable[[str], TensorData],
    strict: bool = True,
) -> list[Mismatch]:
    """Restore a flattened state into ``state``'s objects, in place.

    Everything is checked first: with ``strict=True`` any missing, unexpected, mis-shaped
    or mis-typed entry raises :class:`StateMismatchError` listing them all before anything
    is written. Then tensors are copied in place (references stay valid), objects get
    ``load_state_dict``, and Python values and JAX arrays are replaced in their containers.

    Args:
      state: the state to restore into (the dict that was flattened, or one built alike).
      tree: ``FlatState.tree`` as saved.
      get_tensor: returns the ``TensorData`` saved under a name; raises KeyError for an
        unknown name. Buffers are only read during this call.
      strict: False restores what matches and skips the rest.

    Returns:
      The entries that were skipped (empty when ``strict``); they are also logged.

    Example:
        >>> import numpy as np
        >>> w = np.zeros(2)
        >>> flat = flatten_state({"w": np.ones(2)})
        >>> restore_state({"w": w}, flat.tree, flat.tensors.__getitem__)
        []
        >>> w
        array([1., 1.])
    """
    if tree.get("version") != TREE_VERSION or not isinstance(tree.get("root"), Mapping):
        raise ValueError(
            f"Unsupported state tree (version {tree.get('version')!r}); this version of "
            f"trainhooks reads version {TREE_VERSION}."
        )
    restorer = Restorer(get_tensor)
    if strict:
        restorer.restore(state, tree["root"], "state")
        if restorer.problems:
            raise StateMismatchError(restorer.problems)
    restorer.apply = True
    restorer.problems = []
    restorer.restore(state, tree["root"], "state")
    for problem in restorer.problems:
        logger.warning("Not restored (strict=False): %s", problem)
    return restorer.problems


# --- flatten ---------------------------------------------------------------------------


def _join(name: str, key: object) -> str:
    return f"{name}/{key}" if name else str(key)


class _Flattener:
    def __init__(self, *, collect: bool, copy: bool) -> None:
        self.collect = collect
        self.copy = copy
        self.tensors: dict[str, TensorData] = {}
        self.frameworks: set[str] = set()
        self._paths: dict[str, str] = {}  # tensor name -> path, to catch collisions

    def root(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of names to values, got {type(state).__name__}.")
        for name in RESERVED_NAMES.intersection(state):
            raise ValueError(
                f"state[{name!r}]: the name {name!r} is reserved (checkpoints store the global "
                "step under it); the session tracks the step itself, so rename this entry."
            )
        return self.node(dict(state), "state", "")

    def node(self, value: Any, path: str, name: str) -> dict[str, Any]:
        adapter = array_adapter_for(value)
        if adapter is not None:
            try:
                spec = adapter.spec(value)
            except TypeError as e:
                raise TypeError(f"{path} {e}.") from None
            self._claim(name, path)
            self.frameworks.add(adapter.framework)
            if self.collect:
                self.tensors[name] = adapter.to_tensor_data(value, copy=self.copy)
            node: dict[str, Any] = {
                "type": "tensor",
                "framework": adapter.framework,
                "name": name,
                "dtype": spec.dtype,
                "shape": list(spec.shape),
            }
            if spec.device is not None:
                node["device"] = spec.device
            if spec.scalar:
                node["scalar"] = True
            return node
        if stateful_adapter_for(value) is not None:
            state_dict = value.state_dict()
            path = f"{path}.state_dict()"
            cls = type(value)
            node = {
                "type": "object",
                "class": f"{cls.__module__}.{cls.__qualname__}",
                "state": self.node(state_dict, path, name),
            }
            metadata = getattr(state_dict, "_metadata", None)
            if isinstance(metadata, dict) and pure(metadata):
                node["metadata"] = self.node(metadata, f"{path}._metadata", name)
            return node
        if isinstance(value, dict):
            items = []
            for key, child in value.items():
                if not isinstance(key, (str, *pyvalues.DICT_KEY_TYPES)):
                    raise TypeError(
                        f"{path} has a key of unsupported type {type(key).__qualname__} "
                        f"({key!r}): pass a dict with str, int, float, bool or None keys."
                    )
                child_node = self.node(child, f"{path}[{key!r}]", _join(name, key))
                items.append([pyvalues.encode_key(key), child_node])
            return {"type": "dict", "items": items}
        if isinstance(value, (list, tuple)):
            kind = "list" if isinstance(value, list) else "tuple"
            children = [self.node(v, f"{path}[{i}]", _join(name, i)) for i, v in enumerate(value)]
            return {"type": kind, "items": children}
        if pyvalues.is_value(value):
            return pyvalues.encode_value(value)
        raise TypeError(f"{path} has unsupported type {type(value).__qualname__}: {SUPPORTED}.")

    def _claim(self, name: str, path: str) -> None:
        other = self._paths.setdefault(name, path)
        if other != path:
            raise ValueError(
                f"{path} and {other} would both be saved as tensor {name!r} (names join "
                "keys with '/'): rename one of the keys."
            )
