"""Flattening a state: the walk behind ``tree.flatten_state`` and ``tree.check_state``.

:class:`Flattener` walks the state once, depth first, and collects every array as a
column entry (``columns.TensorColumns``: name, dtype code, shape, source) while it
builds the JSON tree that ``tree.py`` describes. A plain host NumPy array of a dtype
stored as it is (``columns.GATHER_DTYPES``) is kept as it is; everything else goes
through its framework's adapter (``adapters/``). Two values that would be saved under
one tensor name are found after the walk, and only then is the state walked again to
name both in the error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np

from trainhooks.checkpoint.format.columns import GATHER_DTYPES, Source
from trainhooks.checkpoint.format.names import first_duplicate
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state.adapters import ArrayAdapter, array_adapter_for
from trainhooks.checkpoint.state.adapters import python as pyvalues
from trainhooks.checkpoint.state.adapters.numpy import NumpyAdapter
from trainhooks.checkpoint.state.tree_nodes import (
    ARRAY,
    DICT,
    KEY,
    METADATA,
    OBJECT,
    ROOT,
    SEQUENCE,
    STATE_DICT,
    VALUE,
    Path,
    kind_of,
    pure,
    render,
    unsupported,
)

__all__ = ["RESERVED_NAMES", "Flattener", "PlainDict"]

NUMPY = NumpyAdapter()
#: Dicts of at least this many entries try the bulk path (:meth:`Flattener.plain_dict_node`).
_BULK = 32
_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")

#: top-level state keys the format uses itself.
RESERVED_NAMES = frozenset({"global_step"})


class Flattener:
    """One walk over a state: :meth:`root` returns the tree and fills the columns.

    Args:
      collect: gather the tensors (False: only check the state, as ``check_state``).
      copy: buffers that never alias the state (``flatten_state(copy=True)``).
      host_copy: ``flatten_state``'s per-leaf copy hook, or None.
      memo: the previous walk's plain dicts of arrays (:class:`PlainDict`, by tensor-name
        prefix), reused where this walk finds the same keys, dtypes and shapes; the walk
        leaves its own in :attr:`memo_out`. None: nothing kept.

    Example:
        >>> import numpy as np
        >>> f = Flattener(collect=True, copy=False, host_copy=None)
        >>> f.root({"w": np.zeros(2, np.float32)}), f.names
        ({'dict': ['w'], 'values': [['numpy', 'F32', [2]]]}, ['w'])
    """

    def __init__(
        self,
        *,
        collect: bool,
        copy: bool,
        host_copy: Callable[[str, Any], TensorData | None] | None,
        memo: Mapping[str, PlainDict] | None = None,
    ) -> None:
        self.collect = collect
        self.memo = memo
        self.memo_out: dict[str, PlainDict] = {}
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
        # Tied arrays (adapters' identity): the first name of each array and the array
        # itself, kept alive so that its identity is not reused during the walk.
        self._ties: dict[Any, tuple[str, Any]] = {}
        self.tied_names: list[str] = []  # arrays saved as another name's bytes
        #: the tree holds nodes only tree version 3 reads (tied arrays, typed JAX keys)
        self.extended = False
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
        if self._plain and self.collect and _repeats_an_object(self.sources):
            # One NumPy array under two names, which the inlined plain path does not
            # look for (a lookup per array): walk again, every array through leaf(),
            # which stores it once.
            self._reset()
            self._plain = False
            root = self.node(dict(state), ROOT, "")
        names = self.names + self.tied_names if self.tied_names else self.names
        if self.find is None and len(set(names)) != len(names):
            dup = first_duplicate(names)
            assert dup is not None  # the names are not all distinct
            first, second = self._paths_of(dup)
            raise ValueError(
                f"{second} and {first} would both be saved as tensor {dup!r} (names join "
                "keys with '/'): rename one of the keys."
            )
        return root

    def _reset(self) -> None:
        self.names, self.codes, self.shapes, self.sources = [], [], [], []
        self.frameworks = set()
        self._leaves, self._ties, self.tied_names = {}, {}, []
        self.extended = False
        self.memo_out = {}

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
        raise TypeError(f"{unsupported(value, path)}.")

    def dict_node(self, value: Mapping[Any, Any], path: Path, name: str) -> dict[str, Any]:
        if self._plain and len(value) >= _BULK:
            bulk = self.plain_dict_node(value, name)
            if bulk is not None:
                return bulk
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

    def plain_dict_node(self, value: Mapping[Any, Any], name: str) -> dict[str, Any] | None:
        """:meth:`dict_node` in bulk for a dict of str keys and plain NumPy arrays of
        ``GATHER_DTYPES`` (None for any other dict): each column in one pass (C loops), and
        the names, codes and nodes of the previous walk reused when its keys, dtypes and
        shapes are the same. ``dict_node``'s loop is the reference a test compares it with.
        """
        keys = list(value)
        children = list(value.values())
        if set(map(type, children)) != {np.ndarray} or set(map(type, keys)) != {str}:
            return None
        dtypes = list(map(_DTYPE, children))
        shapes = list(map(_SHAPE, children))
        plan = None if self.memo is None else self.memo.get(name)
        if plan is None or plan.keys != keys or plan.dtypes != dtypes or plan.shapes != shapes:
            found = list(map(GATHER_DTYPES.get, dtypes))
            if None in found:
                return None
            codes: list[str] = found  # type: ignore[assignment]
            kinds: dict[tuple[str, tuple[int, ...]], list[Any]] = {}
            for code, shape in set(zip(codes, shapes)):
                node = self._leaves.get(("numpy", code, shape))
                if node is None:
                    node = self._leaves["numpy", code, shape] = ["numpy", code, list(shape)]
                kinds[code, shape] = node
            nodes = list(map(kinds.__getitem__, zip(codes, shapes)))
            names = [f"{name}/{k}" for k in keys] if name else keys
            plan = PlainDict(keys, dtypes, shapes, codes, names, nodes)
        self.memo_out[name] = plan
        self.frameworks.add("numpy")
        self.names += plan.names
        self.codes += plan.codes
        self.shapes += plan.shapes  # the previous walk's tuples: equal, and cheaper to compare
        self.sources += children
        return {"dict": plan.keys, "values": plan.nodes}

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
        finder = Flattener(collect=False, copy=False, host_copy=None)
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
        extra: dict[str, Any] = {}
        identity = adapter.identity(value)
        if identity is not None:
            first = self._ties.get(identity)
            if first is None:
                self._ties[identity] = (name, value)
            else:  # the same array as an earlier name: its bytes are stored there
                self.tied_names.append(name)
                extra["tied"] = first[0]
        if not extra:
            self.names.append(name)
            if self.collect:
                data = None if self.host_copy is None else self.host_copy(name, value)
                if data is None:
                    data = adapter.to_tensor_data(value, copy=self.copy)
                self.codes.append(data.dtype)
                self.shapes.append(data.shape)
                self.sources.append(data)
        if spec.key_impl is not None:
            extra["key"] = spec.key_impl
        if extra:
            self.extended = True
            return [framework, spec.dtype, list(spec.shape), spec.device, spec.scalar, extra]
        if spec.scalar or spec.device not in (None, "cpu"):
            return [framework, spec.dtype, list(spec.shape), spec.device, spec.scalar]
        key = (framework, spec.dtype, spec.shape)
        node = self._leaves.get(key)  # one shared JSON node per kind of array
        if node is None:
            node = self._leaves[key] = [framework, spec.dtype, list(spec.shape)]
        return node


def _repeats_an_object(sources: list[Any]) -> bool:
    """Whether one object is in ``sources`` twice: ~5 ms for 100k arrays, a third of a set
    of their ids (aligned addresses hash badly)."""
    if len(sources) < 2:
        return False
    ids = np.fromiter(map(id, sources), np.uintp, len(sources))
    ids.sort()
    return bool((ids[1:] == ids[:-1]).any())


class PlainDict(NamedTuple):
    """A dict of plain NumPy arrays as one walk flattened it (:meth:`Flattener.plain_dict_node`).

    Shared by the trees of every walk that reuses it: never modified.
    """

    keys: list[str]
    dtypes: list[np.dtype[Any]]
    shapes: list[tuple[int, ...]]
    codes: list[str]
    names: list[str]
    nodes: list[list[Any]]


class _Found(Exception):
    """Raised by a :class:`Flattener` with ``find`` set, at the second value so named."""
