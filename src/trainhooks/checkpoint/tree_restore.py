"""Restoring a state tree into the user's objects: the walk behind ``tree.restore_state``.

:class:`Restorer` walks the state and the tree together. Run once with ``apply=False``
it only collects :class:`Mismatch` entries; with ``apply=True`` it also writes, skipping
every entry that mismatches. ``tree.restore_state`` runs the check pass first when strict,
so a mismatch is reported before anything is touched.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from trainhooks import errors
from trainhooks.checkpoint.adapters import (
    ArraySpec,
    array_adapter_for,
    array_adapter_named,
    stateful_adapter_for,
)
from trainhooks.checkpoint.adapters import python as pyvalues
from trainhooks.checkpoint.dtypes import storage_spec
from trainhooks.checkpoint.tensor import TensorData

__all__ = ["SUPPORTED", "Mismatch", "Restorer", "pure"]

SUPPORTED = (
    "pass an object with state_dict()/load_state_dict(), a NumPy array, torch tensor or "
    "JAX array, a bool/int/float/str/bytes/None, or a dict/list/tuple nesting these"
)


class Mismatch(NamedTuple):
    """One entry of the state that a checkpoint cannot be restored into."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


def pure(value: object) -> bool:
    """Whether ``value`` is Python data only (values and containers of them)."""
    if isinstance(value, (list, tuple)):
        return all(pure(v) for v in value)
    if isinstance(value, dict):
        return all(pure(v) for v in value.values())
    return pyvalues.is_value(value) and array_adapter_for(value) is None


def _describe(node: Mapping[str, Any]) -> str:
    kind = node.get("type")
    if kind == "tensor":
        return f"an array ({node['dtype']}, shape {node['shape']})"
    if kind == "object":
        return f"the state of a {node.get('class', 'stateful object')}"
    return f"a {kind}" if kind in ("dict", "list", "tuple") else f"a Python {kind}"


def _node_pure(node: Mapping[str, Any]) -> bool:
    kind = node["type"]
    if kind in ("tensor", "object"):
        return False
    if kind == "dict":
        return all(_node_pure(child) for _, child in node["items"])
    if kind in ("list", "tuple"):
        return all(_node_pure(child) for child in node["items"])
    return True


def _rebuild_tuple(old: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    if hasattr(old, "_fields"):  # namedtuple
        return type(old)(*items)
    try:
        return type(old)(items)
    except TypeError:
        return tuple(items)


class Restorer:
    """Walks the state and the tree together; checks only, or (``apply``) also writes."""

    def __init__(self, get_tensor: Callable[[str], TensorData]) -> None:
        self.get_tensor = get_tensor
        self.apply = False
        self.problems: list[Mismatch] = []
        self._data: dict[str, TensorData | None] = {}

    def problem(self, path: str, text: str) -> None:
        self.problems.append(Mismatch(path, text))

    def restore(self, target: Any, node: Mapping[str, Any], path: str) -> Any:
        """Restore ``node`` into ``target``; returns what the container should hold."""
        adapter = array_adapter_for(target)
        if adapter is not None:
            return self._restore_array(adapter, target, node, path)
        stateful = stateful_adapter_for(target)
        if stateful is not None:
            return self._restore_object(stateful, target, node, path)
        if isinstance(target, dict):
            return self._restore_dict(target, node, path)
        replaceable = pyvalues.is_value(target) or (
            isinstance(target, (list, tuple)) and node["type"] in ("list", "tuple") and pure(target)
        )
        if replaceable and _node_pure(node):
            return self._replace(target, node, path)
        if isinstance(target, (list, tuple)):
            return self._restore_sequence(target, node, path)
        if not pyvalues.is_value(target):
            self.problem(path, f"has unsupported type {type(target).__qualname__}: {SUPPORTED}")
        else:
            self.problem(
                path, f"is a Python {type(target).__name__}, the checkpoint has {_describe(node)}"
            )
        return target

    def _fetch(self, node: Mapping[str, Any], path: str) -> TensorData | None:
        name = node["name"]
        if name not in self._data:
            data: TensorData | None
            try:
                data = self.get_tensor(name)
            except (KeyError, errors.NotFoundError):
                data = None
                self.problem(
                    path, f"is saved as tensor {name!r}, which the checkpoint's data lacks"
                )
            else:
                expected = storage_spec(node["dtype"], tuple(node["shape"]))
                if (data.dtype, tuple(data.shape)) != expected or data.buffer.nbytes != data.nbytes:
                    self.problem(
                        path,
                        f"is saved as tensor {name!r} of {expected}, but the data holds "
                        f"{data.dtype} {tuple(data.shape)} in {data.buffer.nbytes} bytes",
                    )
                    data = None
            self._data[name] = data
        return self._data[name]

    @staticmethod
    def _spec(node: Mapping[str, Any]) -> ArraySpec:
        shape = tuple(int(n) for n in node["shape"])
        return ArraySpec(node["dtype"], shape, node.get("device"), bool(node.get("scalar")))

    def _restore_array(self, adapter: Any, target: Any, node: Mapping[str, Any], path: str) -> Any:
        if node["type"] != "tensor":
            self.problem(path, f"is an array, the checkpoint has {_describe(node)}")
            return target
        try:
            have = adapter.spec(target)
        except TypeError as e:
            self.problem(path, f"{e}")
            return target
        want = self._spec(node)
        count = len(self.problems)
        if have.dtype != want.dtype:
            self.problem(path, f"has dtype {have.dtype}, the checkpoint has {want.dtype}")
        if have.shape != want.shape:
            self.problem(
                path, f"has shape {list(have.shape)}, the checkpoint has {list(want.shape)}"
            )
        unwritable = adapter.writable_problem(target)
        if unwritable:
            self.problem(path, unwritable)
        data = self._fetch(node, path)
        if data is None or len(self.problems) > count or not self.apply:
            return target
        return adapter.restore(target, data, want)

    def _restore_object(self, adapter: Any, target: Any, node: Mapping[str, Any], path: str) -> Any:
        if node["type"] != "object":
            self.problem(
                path, f"is a {type(target).__qualname__}, the checkpoint has {_describe(node)}"
            )
            return target
        count = len(self.problems)
        saved = self._construct(node["state"], f"{path}.state_dict()", build=False)
        if len(self.problems) > count:
            return target  # its saved tensors are unreadable
        found = adapter.problems(target, saved)
        for key, text in found:
            self.problem(f"{path}.state_dict()" + ("" if key is None else f"[{key!r}]"), text)
        if not self.apply or any(key is None for key, _ in found):
            return target
        state_dict = self._construct(node["state"], f"{path}.state_dict()", build=True)
        if found and isinstance(state_dict, dict):
            for key, _ in found:
                state_dict.pop(key, None)
        if "metadata" in node and isinstance(state_dict, dict):
            state_dict = OrderedDict(state_dict)
            state_dict._metadata = self._construct(node["metadata"], path, build=True)  # type: ignore[attr-defined]
        adapter.load(target, state_dict, strict=not found)
        return target

    def _restore_dict(self, target: dict[Any, Any], node: Mapping[str, Any], path: str) -> Any:
        if node["type"] != "dict":
            self.problem(path, f"is a dict, the checkpoint has {_describe(node)}")
            return target
        saved = {pyvalues.decode_key(key): child for key, child in node["items"]}
        for key, value in list(target.items()):
            child_path = f"{path}[{key!r}]"
            if key not in saved:
                self.problem(child_path, "is missing from the checkpoint")
                continue
            new = self.restore(value, saved[key], child_path)
            if self.apply and new is not value:
                target[key] = new
        for key in saved:
            if key not in target:
                self.problem(f"{path}[{key!r}]", "is in the checkpoint but not in the state")
        return target

    def _restore_sequence(self, target: Any, node: Mapping[str, Any], path: str) -> Any:
        kind = type(target).__name__
        if node["type"] not in ("list", "tuple"):
            self.problem(path, f"is a {kind}, the checkpoint has {_describe(node)}")
            return target
        if len(node["items"]) != len(target):
            self.problem(path, f"has {len(target)} items, the checkpoint has {len(node['items'])}")
            return target
        items = [
            self.restore(value, child, f"{path}[{i}]")
            for i, (value, child) in enumerate(zip(target, node["items"]))
        ]
        if not self.apply:
            return target
        if isinstance(target, list):
            for i, (old, new) in enumerate(zip(target, items)):
                if new is not old:
                    target[i] = new
            return target
        changed = any(new is not old for old, new in zip(target, items))
        return _rebuild_tuple(target, items) if changed else target

    def _replace(self, target: Any, node: Mapping[str, Any], path: str) -> Any:
        if not self.apply:
            return target
        new = self._construct(node, path, build=True)
        if isinstance(target, list) and isinstance(new, list):
            target[:] = new  # keep the caller's list object
            return target
        if isinstance(target, tuple) and isinstance(new, tuple) and len(new) == len(target):
            return _rebuild_tuple(target, list(new))  # keep a namedtuple's type
        return new

    def _construct(self, node: Mapping[str, Any], path: str, *, build: bool) -> Any:
        """The saved value of ``node``: arrays built (``build``) or as :class:`ArraySpec`."""
        kind = node["type"]
        if kind == "tensor":
            spec = self._spec(node)
            data = self._fetch(node, path)
            if not build or data is None:
                return spec
            return array_adapter_named(node["framework"]).build(data, spec)
        if kind == "object":
            return self._construct(node["state"], f"{path}.state_dict()", build=build)
        if kind == "dict":
            out = {}
            for key, child in node["items"]:
                key = pyvalues.decode_key(key)
                out[key] = self._construct(child, f"{path}[{key!r}]", build=build)
            return out
        if kind in ("list", "tuple"):
            items = [
                self._construct(child, f"{path}[{i}]", build=build)
                for i, child in enumerate(node["items"])
            ]
            return items if kind == "list" else tuple(items)
        return pyvalues.decode_value(dict(node))
