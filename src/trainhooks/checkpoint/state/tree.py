"""The training state as named tensors plus a JSON tree, and back into the user's objects.

:func:`flatten_state` turns a state (``docs/format.md``) into :class:`FlatState`: every array
becomes a named :class:`~trainhooks.checkpoint.format.tensor.TensorData` (names are ``/``-joined
paths, ``"model/fc.weight"``, ``"optimizer/state/0/exp_avg"``) and ``tree`` records how
the names nest, the adapters used and every other value as JSON. :func:`restore_state`
checks a checkpoint against the state and only then writes it back in place.

The tree is compact, because a state may hold 100k arrays: an array is a JSON array
``[framework, dtype, shape]`` (``[framework, dtype, shape, device, scalar]`` when it
lives on an accelerator or is a NumPy scalar) and its tensor name is implied by where it
sits. Other nodes are JSON objects:

* ``{"dict": [keys], "values": [nodes]}`` (a non-str key as its value node);
* ``{"list": [nodes]}``, ``{"tuple": [nodes]}``;
* ``{"object": "module.Class", "state": node}``: an object's ``state_dict()``
  (``metadata`` for a torch state dict's ``_metadata``);
* Python values: ``{"type": "int", "value": 3}`` and alike (``adapters/python.py``).

Names: a dict's entry ``k`` under name ``n`` is ``n/k`` (``str(k)``), a list's item ``i``
is ``n/i``, an object's state dict keeps the object's name; top-level entries are their
key. ``dtype`` is the logical code (see ``dtypes.py``).

Matching on restore: arrays and objects must be where the state has them; dict keys must
match; a list or tuple holding only Python values, like a Python value, is replaced by the
saved one (its length may differ), while one holding arrays or objects is matched item by
item.

The two walks live in ``tree_flatten.py`` and ``tree_restore.py``; the vocabulary of
nodes and paths both use is ``tree_nodes.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from trainhooks import errors
from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.state.tree_flatten import RESERVED_NAMES, Flattener
from trainhooks.checkpoint.state.tree_nodes import MalformedTree, Mismatch
from trainhooks.checkpoint.state.tree_restore import Locate, Restorer

__all__ = [
    "RESERVED_NAMES",
    "TREE_VERSION",
    "FlatState",
    "MalformedTree",
    "Mismatch",
    "StateMismatchError",
    "check_state",
    "flatten_state",
    "restore_state",
]

logger = logging.getLogger(__name__)

TREE_VERSION = 2


class FlatState(NamedTuple):
    """A state as the format writes it: named tensors and the JSON tree that nests them.

    ``tensors`` maps names to ``TensorData``; :func:`flatten_state` returns it as
    :class:`~trainhooks.checkpoint.format.columns.TensorColumns`, which keeps plain NumPy
    arrays as they are (read when written) and builds a ``TensorData`` only when one is
    looked up. Buffers alias the state's arrays where possible (see :func:`flatten_state`).
    """

    tensors: Mapping[str, TensorData]
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


def flatten_state(
    state: Mapping[str, Any],
    *,
    copy: bool = False,
    host_copy: Callable[[str, Any], TensorData | None] | None = None,
) -> FlatState:
    """Split ``state`` into named tensors and a JSON tree.

    Args:
      state: the training state: a mapping of names to values (``docs/format.md``).
      copy: when False (the default), the buffers of contiguous host arrays alias their
        memory: write them out before the state changes (the next step). Pass True for a
        snapshot the training loop may run on from (background saving); arrays that
        must be copied anyway (accelerator tensors, strided views) are copied only once.
      host_copy: called with ``(tensor name, array)`` for every array; when it returns
        ``TensorData`` that is used instead of the adapter's conversion (e.g. a copy
        into a reused pinned buffer, ``SnapshotPool.copy_leaf``); None falls back to
        the adapter.

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
    flattener = Flattener(collect=True, copy=copy, host_copy=host_copy)
    with paused_gc():
        root = flattener.root(state)
    tree = {"version": TREE_VERSION, "frameworks": sorted(flattener.frameworks), "root": root}
    f = flattener
    return FlatState(TensorColumns(f.names, f.codes, f.shapes, f.sources), tree)


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
    Flattener(collect=False, copy=False, host_copy=None).root(state)


def restore_state(
    state: dict[str, Any],
    tree: Mapping[str, Any],
    get_tensor: Callable[[str], TensorData],
    strict: bool = True,
    *,
    locate: Locate | None = None,
    before_apply: Callable[[], None] | None = None,
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
      locate: optional, ``format.MappedCheckpoint.locate``: where each tensor's checked
        bytes lie; plain NumPy arrays are then copied straight from there (much faster
        for many small arrays than a ``TensorData`` each).
      before_apply: called once everything is checked and before anything is written
        (also before a mismatch is raised); an exception it raises stops the restore.
        ``restore.py`` waits here for the checksum pass it ran alongside the checks.

    Returns:
      The entries that were skipped (empty when ``strict``); they are also logged.

    Raises:
      StateMismatchError: with ``strict``, the checkpoint does not fit the state.
      ValueError: the tree is of another version.
      MalformedTree: (a ``DataLossError``) the tree is not one ``flatten_state`` writes.

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
    restorer = Restorer(get_tensor, locate)
    with paused_gc():
        restorer.plan(state, tree["root"])
    if before_apply is not None:
        before_apply()
    if strict and restorer.problems:
        raise StateMismatchError(restorer.problems)
    with paused_gc():
        restorer.apply()
    for problem in restorer.problems:
        logger.warning("Not restored (strict=False): %s", problem)
    return restorer.problems
