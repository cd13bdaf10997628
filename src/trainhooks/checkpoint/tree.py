"""The training state as named tensors plus a JSON tree, and back into the user's objects.

:func:`flatten_state` turns a state (DESIGN §2) into :class:`FlatState`: every array
becomes a named :class:`~trainhooks.checkpoint.tensor.TensorData` (names are ``/``-joined
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
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

from trainhooks import errors
from trainhooks.checkpoint.adapters import ArrayAdapter, array_adapter_for
from trainhooks.checkpoint.adapters import python as pyvalues
from trainhooks.checkpoint.adapters.numpy import NumpyAdapter
from trainhooks.checkpoint.columns import GATHER_DTYPES, Source, TensorColumns
from trainhooks.checkpoint.manifest import paused_gc
from trainhooks.checkpoint.tensor import TensorData
from trainhooks.checkpoint.tree_nodes import (
    ARRAY,
    DICT,
    KEY,
    METADATA,
    OBJECT,
    ROOT,
    SEQUENCE,
    STATE_DICT,
    SUPPORTED,
    VALUE,
    MalformedTree,
    Mismatch,
    Path,
    kind_of,
    pure,
    render,
)
from trainhooks.checkpoint.tree_restore import Locate, Restorer

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
NUMPY = NumpyAdapter()


#: top-level state keys the format uses itself.
RESERVED_NAMES = frozenset({"global_step"})


class FlatState(NamedTuple):
    """A state as the format writes it: named tensors and the JSON tree that nests them.

    ``tensors`` maps names to ``TensorData``; :func:`flatten_state` returns it as
    :class:`~trainhooks.checkpoint.columns.TensorColumns`, which keeps plain NumPy
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
      state: the training state: a mapping of names to values (DESIGN §2).
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
    flattener = _Flattener(collect=True, copy=copy, host_copy=host_copy)
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
    _Flattener(collect=False, copy=False, host_copy=None).root(state)


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


# --- flatten ---------------------------------------------------------------------------


class _Flattener:
    def __init__(
        self,
        *,
        collect: bool,
        copy: bool,
        host_copy: Callable[[str, Any], TensorData | None] | None,
    ) -> None:
        self.collect = collect
        self.copy = copy
        self.host_copy = host_copy
        # The tensors, as columns (see columns.py); names are kept even without collect,
        # to find two values saved under one name once the walk is done.
        self.names: list[str] = []
        self.codes: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        self.sources: list[Source] = []
        self.frameworks: set[str] = set()
        self._state: Mapping[str, Any] = {}
        self.find: str | None = None  # set by _paths_of: stop at the values named so
        self._found: list[Path] = []
        self._leaves: dict[tuple[str, str, tuple[int, ...]], list[Any]] = {}
        # Plain host NumPy arrays are kept as they are (columns.TensorColumns); a snapshot
        # (copy) or a per-leaf copy (host_copy) needs the general path.
        self._plain = not copy and host_copy is None

    def root(self, state: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict of names to values, got {type(state).__name__}.")
        for name in RESERVED_NAMES.intersection(state):
            raise ValueError(
                f"state[{name!r}]: the name {name!r} is reserved (checkpoints store the global "
                "step under it); the session tracks the step itself, so rename this entry."
            )
        self._state = state
        root = self.node(dict(state), ROOT, "")
        if self.find is None and len(set(self.names)) != len(self.names):
            seen: set[str] = set()
            name = next(n for n in self.names if n in seen or seen.add(n))  # type: ignore[func-returns-value]
            first, second = self._paths_of(name)
            raise ValueError(
                f"{second} and {first} would both be saved as tensor {name!r} (names join "
                "keys with '/'): rename one of the keys."
            )
        return root

    def node(self, value: Any, path: Path, name: str) -> Any:
        if type(value) is np.ndarray:
            return self.ndarray_leaf(value, path, name)
        kind = kind_of(value)
        if kind is ARRAY:
            return self.leaf(array_adapter_for(value), value, path, name)  # type: ignore[arg-type]
        if kind is DICT:
            return self.dict_node(value, path, name)
        if kind is SEQUENCE:
            tag = "list" if isinstance(value, list) else "tuple"
            return {
                tag: [
                    self.node(v, (path, KEY, i), f"{name}/{i}" if name else str(i))
                    for i, v in enumerate(value)
                ]
            }
        if kind is OBJECT:
            state_dict = value.state_dict()
            path = (path, STATE_DICT, None)
            cls = type(value)
            node = {
                "object": f"{cls.__module__}.{cls.__qualname__}",
                "state": self.node(state_dict, path, name),
            }
            metadata = getattr(state_dict, "_metadata", None)
            if isinstance(metadata, dict) and pure(metadata):
                node["metadata"] = self.node(metadata, (path, METADATA, None), name)
            return node
        if kind is VALUE:
            return pyvalues.encode_value(value)
        raise TypeError(
            f"{render(path)} has unsupported type {type(value).__qualname__}: {SUPPORTED}."
        )

    def dict_node(self, value: Mapping[Any, Any], path: Path, name: str) -> dict[str, Any]:
        keys: list[Any] = []
        values: list[Any] = []
        prefix = f"{name}/" if name else ""
        # The common case (a str key holding a plain NumPy array) inline: a state of 100k
        # arrays spends its flatten time here.
        plain, ndarray, codes_of, leaves = self._plain, np.ndarray, GATHER_DTYPES, self._leaves
        names, codes, shapes, sources = self.names, self.codes, self.shapes, self.sources
        for key, child in value.items():
            if plain and type(child) is ndarray and type(key) is str:
                code = codes_of.get(child.dtype)
                if code is not None:
                    shape = child.shape
                    node = leaves.get(("numpy", code, shape))
                    if node is None:
                        node = leaves["numpy", code, shape] = ["numpy", code, list(shape)]
                        self.frameworks.add("numpy")
                    keys.append(key)
                    values.append(node)
                    names.append(prefix + key)
                    codes.append(code)
                    shapes.append(shape)
                    sources.append(child)
                    continue
            if type(key) is str:
                keys.append(key)
                child_name = prefix + key
            elif isinstance(key, pyvalues.DICT_KEY_TYPES):
                keys.append(pyvalues.encode_key(key))
                child_name = f"{name}/{key}" if name else str(key)
            else:
                raise TypeError(
                    f"{render(path)} has a key of unsupported type {type(key).__qualname__} "
                    f"({key!r}): pass a dict with str, int, float, bool or None keys."
                )
            values.append(self.node(child, (path, KEY, key), child_name))
        return {"dict": keys, "values": values}

    def ndarray_leaf(self, value: np.ndarray[Any, Any], path: Path, name: str) -> list[Any]:
        """:meth:`leaf` for a plain NumPy array: kept as it is (``columns.TensorColumns``)."""
        code = GATHER_DTYPES.get(value.dtype)
        if code is None or not self._plain or self.find is not None:
            return self.leaf(NUMPY, value, path, name)
        shape = value.shape
        self.names.append(name)
        self.codes.append(code)
        self.shapes.append(shape)
        self.sources.append(value)
        key = ("numpy", code, shape)
        node = self._leaves.get(key)
        if node is None:
            node = self._leaves[key] = ["numpy", code, list(shape)]
            self.frameworks.add("numpy")
        return node

    def _paths_of(self, name: str) -> tuple[str, str]:
        """The paths of the first two values saved as ``name`` (walks the state again)."""
        finder = _Flattener(collect=False, copy=False, host_copy=None)
        finder.find = name
        finder._plain = False  # every array through leaf(), which records the paths
        try:
            finder.root(self._state)
        except _Found:
            pass
        found = [render(p) for p in finder._found] + ["another entry"] * 2
        return found[0], found[1]

    def leaf(self, adapter: ArrayAdapter, value: Any, path: Path, name: str) -> list[Any]:
        try:
            spec = adapter.spec(value)
        except TypeError as e:
            raise TypeError(f"{render(path)} {e}.") from None
        if name == self.find:
            self._found.append(path)
            if len(self._found) == 2:
                raise _Found()
        framework = adapter.framework
        self.frameworks.add(framework)
        self.names.append(name)
        if self.collect:
            data = None if self.host_copy is None else self.host_copy(name, value)
            if data is None:
                data = adapter.to_tensor_data(value, copy=self.copy)
            self.codes.append(data.dtype)
            self.shapes.append(data.shape)
            self.sources.append(data)
        if spec.scalar or spec.device not in (None, "cpu"):
            return [framework, spec.dtype, list(spec.shape), spec.device, spec.scalar]
        key = (framework, spec.dtype, spec.shape)
        node = self._leaves.get(key)  # one shared JSON node per kind of array
        if node is None:
            node = self._leaves[key] = [framework, spec.dtype, list(spec.shape)]
        return node


class _Found(Exception):
    """Raised by a :class:`_Flattener` with ``find`` set, at the second value so named."""
