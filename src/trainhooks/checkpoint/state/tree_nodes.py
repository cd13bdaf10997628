"""The vocabulary of the state tree: what a value is, what a node is, and paths for messages.

``tree.py`` writes nodes and ``tree_restore.py`` reads them; both classify state values
with :func:`kind_of` (decided once per type) and name places in the state with a
:data:`Path`, a chain of tuples rendered (``state['model'].state_dict()['w']``) only
when a message needs it. Node readers treat the tree as hostile: anything that is not a
node ``flatten_state`` writes raises :class:`MalformedTree`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeAlias

from trainhooks import errors
from trainhooks.checkpoint.state.adapters import ArraySpec, array_adapter_for, stateful_adapter_for
from trainhooks.checkpoint.state.adapters import python as pyvalues

__all__ = [
    "ARRAY",
    "DICT",
    "KEY",
    "METADATA",
    "OBJECT",
    "ROOT",
    "SEQUENCE",
    "STATE_DICT",
    "SUPPORTED",
    "UNSUPPORTED",
    "VALUE",
    "MalformedTree",
    "Mismatch",
    "Path",
    "describe",
    "dict_items",
    "entry_of",
    "kind_of",
    "leaf_spec",
    "leaf_tied",
    "node_kind",
    "node_pure",
    "pure",
    "render",
    "sequence_items",
    "tied_aliases",
    "unsupported",
]

SUPPORTED = (
    "pass an object with state_dict()/load_state_dict(), a NumPy array, torch tensor or "
    "JAX array, a bool/int/float/str/bytes/None, or a dict/list/tuple nesting these"
)

# What a state value is, decided once per type (see kind_of).
ARRAY, OBJECT, DICT, SEQUENCE, VALUE, UNSUPPORTED = (
    "array",
    "object",
    "dict",
    "sequence",
    "value",
    "unsupported",
)
_KINDS: dict[type, str] = {}

#: A path into the state: None for the state itself, else (parent, step, key).
Path: TypeAlias = "tuple[Path, str, Any] | None"
ROOT: Path = None
KEY, STATE_DICT, METADATA = "key", "state_dict", "metadata"


class MalformedTree(errors.DataLossError):
    """The checkpoint's state tree is not one ``tree.flatten_state`` writes."""


class Mismatch(NamedTuple):
    """One entry of the state that a checkpoint cannot be restored into."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


def render(path: Path) -> str:
    """``state['model'].state_dict()['w']`` for a :data:`Path`."""
    parts = []
    while path is not None:
        path, step, key = path
        parts.append(
            f"[{key!r}]" if step == KEY else ".state_dict()" if step == STATE_DICT else "._metadata"
        )
    return "state" + "".join(reversed(parts))


def entry_of(path: Path) -> tuple[Any, bool] | None:
    """The top-level state key a :data:`Path` lies under, and whether the path is that
    entry itself (or, for an object, its whole state dict); None for the state itself."""
    if path is None:
        return None
    steps: list[tuple[Any, str, Any]] = []
    while path is not None:
        steps.append(path)
        path = path[0]
    entry = steps[-1]
    whole = len(steps) == 1 or (len(steps) == 2 and steps[0][1] == STATE_DICT)
    return entry[2], whole


_RNG_TYPES = {
    "numpy.random._generator.Generator": "numpy.random.Generator",
    "numpy.random.mtrand.RandomState": "numpy.random.RandomState",
    "torch._C.Generator": "torch.Generator",
    "torch.Generator": "torch.Generator",
}


def unsupported(value: object, path: Path) -> str:
    """The message for a value no checkpoint can hold, with a hint where one helps."""
    cls = type(value)
    what = f"{render(path)} has unsupported type {cls.__qualname__}"
    rng = _RNG_TYPES.get(f"{cls.__module__}.{cls.__qualname__}")
    if rng is None and any(
        f"{c.__module__}.{c.__qualname__}" == "numpy.random.bit_generator.BitGenerator"
        for c in cls.__mro__
    ):
        rng = "numpy.random.BitGenerator"
    if rng is not None:
        return (
            f"{what}: a {rng} is not saved as it is; wrap it in trainhooks.RNGState, e.g. "
            "state['rng'] = th.RNGState({'data': generator}), so that every checkpoint "
            "saves its state and every restore sets it"
        )
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (
            f"{what}: a dataclass instance is not saved as it is; convert it with "
            "dataclasses.asdict(...) (and rebuild it after a restore) or give it "
            "state_dict()/load_state_dict()"
        )
    return f"{what}: {SUPPORTED}"


def kind_of(value: object) -> str:
    """What ``value`` is to a checkpoint: ARRAY, OBJECT, DICT, SEQUENCE, VALUE or UNSUPPORTED."""
    kind = _KINDS.get(type(value))
    if kind is not None:
        return kind
    if array_adapter_for(value) is not None:
        kind = ARRAY
    elif stateful_adapter_for(value) is not None:
        return OBJECT  # decided per object: callables may be instance attributes
    elif isinstance(value, dict):
        kind = DICT
    elif isinstance(value, (list, tuple)):
        kind = SEQUENCE
    elif pyvalues.is_value(value):
        kind = VALUE
    else:
        return UNSUPPORTED
    _KINDS[type(value)] = kind
    return kind


def pure(value: object) -> bool:
    """Whether ``value`` is Python data only (values and containers of them)."""
    kind = kind_of(value)
    if kind is SEQUENCE:
        return all(pure(v) for v in value)  # type: ignore[attr-defined]
    if kind is DICT:
        return all(pure(v) for v in value.values())  # type: ignore[attr-defined]
    return kind is VALUE


def node_kind(node: object) -> str:
    """``tensor``, ``dict``, ``list``, ``tuple``, ``object`` or a Python value's type."""
    if type(node) is list:
        return "tensor"
    if type(node) is dict:
        for kind in ("dict", "list", "tuple", "object"):
            if kind in node:
                return kind
        value_type = node.get("type")
        if type(value_type) is str:
            return value_type
    raise MalformedTree(f"the state tree holds an unknown node {str(node)[:80]}")


def node_pure(node: Any) -> bool:
    kind = node_kind(node)
    if kind in ("tensor", "object"):
        return False
    if kind == "dict":
        return all(node_pure(child) for child in node["values"])
    if kind in ("list", "tuple"):
        return all(node_pure(child) for child in node[kind])
    return True


def leaf_spec(node: list[Any]) -> tuple[str, ArraySpec]:
    """The framework and :class:`ArraySpec` of a tensor node.

    A tensor node is ``[framework, dtype, shape]``, ``[framework, dtype, shape, device,
    scalar]``, or that and a JSON object of extras (tree version 3): ``"key"``, a typed
    JAX key's implementation (the array is its ``key_data``); ``"tied"``, the name of the
    tensor that holds this array's bytes (see :func:`leaf_tied`).
    """
    try:
        extra: dict[str, Any] = {}
        if len(node) == 3:
            framework, dtype, shape = node
            device, scalar = None, False
        elif len(node) == 5:
            framework, dtype, shape, device, scalar = node
        else:
            framework, dtype, shape, device, scalar, extra = node
            if type(extra) is not dict or not set(extra) <= {"key", "tied"}:
                raise TypeError
        key_impl = extra.get("key")
        spec = ArraySpec(dtype, tuple(shape), device, scalar, key_impl)
        if not (
            type(framework) is str
            and type(dtype) is str
            and all(type(n) is int and n >= 0 for n in spec.shape)
            and (device is None or type(device) is str)
            and type(scalar) is bool
            and (key_impl is None or type(key_impl) is str)
            and type(extra.get("tied", "")) is str
        ):
            raise TypeError
    except (TypeError, ValueError):
        raise MalformedTree(f"the state tree holds a malformed array {str(node)[:80]}") from None
    return framework, spec


def leaf_tied(node: list[Any], name: str) -> str:
    """The tensor that holds a tensor node's bytes: its own ``name``, or for an array tied
    to one saved before it (the same memory under two names), that one's name."""
    if len(node) == 6 and type(node[5]) is dict:
        tied = node[5].get("tied")
        if type(tied) is str:
            return tied
    return name


def describe(node: Any) -> str:
    kind = node_kind(node)
    if kind == "tensor":
        _, spec = leaf_spec(node)
        if spec.key_impl is not None:
            return f"a JAX key array ({spec.key_impl}, key data shape {list(spec.shape)})"
        return f"an array ({spec.dtype}, shape {list(spec.shape)})"
    if kind == "object":
        return f"the state of a {node.get('object') or 'stateful object'}"
    return f"a {kind}" if kind in ("dict", "list", "tuple") else f"a Python {kind}"


def dict_items(node: Mapping[str, Any]) -> list[tuple[Any, Any]]:
    keys, values = node.get("dict"), node.get("values")
    if type(keys) is not list or type(values) is not list or len(keys) != len(values):
        raise MalformedTree("a dict node's keys and values do not pair up")
    if not keys or set(map(type, keys)) == {str}:  # the common case, in C
        items = list(zip(keys, values))
        if len(set(keys)) != len(items):
            raise MalformedTree("a dict node repeats a key")
        return items
    try:
        items = [(pyvalues.decode_key(k), v) for k, v in zip(keys, values)]
    except (KeyError, TypeError, ValueError):
        raise MalformedTree(f"a dict node has a malformed key in {str(keys)[:80]}") from None
    if len({k for k, _ in items}) != len(items):
        raise MalformedTree("a dict node repeats a key")
    return items


def sequence_items(node: Mapping[str, Any], kind: str) -> list[Any]:
    items = node[kind]
    if type(items) is not list:
        raise MalformedTree(f"a {kind} node's items are not a list")
    return items


def tied_aliases(tree: object) -> dict[str, str]:
    """Every tied array's name mapped to the name its bytes are stored under.

    A checkpoint stores the same memory under two names once (tree version 3); readers
    that look tensors up by name (``load_variable``) resolve the second name through
    this. A tree of another shape has none.

    Example:
        >>> tied_aliases({"version": 2, "root": {"dict": [], "values": []}})
        {}
    """
    aliases: dict[str, str] = {}
    if isinstance(tree, dict) and tree.get("version") == 3:
        try:
            _collect_aliases(tree.get("root"), "", aliases)
        except (MalformedTree, KeyError, TypeError):
            return {}  # a reader reports a malformed tree when it restores, not here
    return aliases


def _collect_aliases(node: Any, name: str, aliases: dict[str, str]) -> None:
    kind = node_kind(node)
    if kind == "tensor":
        stored = leaf_tied(node, name)
        if stored != name:
            aliases[name] = stored
    elif kind == "dict":
        for key, child in dict_items(node):
            _collect_aliases(child, f"{name}/{key}" if name else str(key), aliases)
    elif kind in ("list", "tuple"):
        for i, child in enumerate(sequence_items(node, kind)):
            _collect_aliases(child, f"{name}/{i}" if name else str(i), aliases)
    elif kind == "object":
        _collect_aliases(node["state"], name, aliases)
