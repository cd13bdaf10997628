"""Restoring a state tree into the user's objects: the walk behind ``tree.restore_state``.

:class:`Restorer` walks the state and the tree together once (:meth:`Restorer.plan`):
it collects every :class:`Mismatch` and, for the entries that match, what to do: array
copies into the user's memory, ``load_state_dict`` calls, values to replace in their
containers. Nothing is written until the plan found no problem (or ``strict=False``):
then ``tree.restore_state`` calls its ``before_write`` (which may take large copies out
and do them itself, ``HostCopies.take_large``) and :meth:`Restorer.apply`. Copies into
host memory run in one batch, the large ones on a few threads (``host_copies.py``).

Paths for messages (``state['model'].state_dict()['weight']``) are built only when a
message needs one: during the walk a path is a chain of tuples (:data:`Path`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from trainhooks import errors
from trainhooks.checkpoint.format.columns import GATHER_DTYPES
from trainhooks.checkpoint.format.dtypes import storage_spec
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.state.adapters import (
    ArrayAdapter,
    ArraySpec,
    array_adapter_for,
    array_adapter_named,
    stateful_adapter_for,
)
from trainhooks.checkpoint.state.adapters import python as pyvalues
from trainhooks.checkpoint.state.host_copies import PARALLEL_COPY_BYTES, HostCopies, plan_run
from trainhooks.checkpoint.state.tree_in_place import plan_in_place
from trainhooks.checkpoint.state.tree_nodes import (
    ARRAY,
    DICT,
    KEY,
    METADATA,
    OBJECT,
    ROOT,
    SEQUENCE,
    STATE_DICT,
    UNSUPPORTED,
    VALUE,
    MalformedTree,
    Mismatch,
    Path,
    describe,
    dict_items,
    kind_of,
    leaf_spec,
    leaf_tied,
    node_kind,
    node_pure,
    pure,
    render,
    sequence_items,
    unsupported,
)

__all__ = ["Restorer"]

#: Threads building the large arrays of an object's state dict (``_construct_parallel``).
_BUILD_THREADS = min(8, os.cpu_count() or 1)


def _child_name(name: str, key: object) -> str:
    return f"{name}/{key}" if name else str(key)


def _rebuild_tuple(old: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    if hasattr(old, "_fields"):  # namedtuple
        return type(old)(*items)
    try:
        return type(old)(items)
    except TypeError:
        return tuple(items)


#: A deferred replacement: called during apply, returns what the container should hold.
Replacement = Callable[[], Any]


#: ``locate(name) -> (dtype code, shape, source, start, end)``: where a tensor's checked
#: bytes lie in a uint8 array (``format.MappedCheckpoint.locate``); KeyError if absent.
Locate = Callable[[str], tuple[str, tuple[int, ...], np.ndarray, int, int]]


class Restorer:
    """Plans a restore (checking everything) with :meth:`plan`, then writes with :meth:`apply`.

    With ``locate``, plain NumPy arrays are restored straight from the source arrays it
    names (no ``TensorData`` per tensor); everything else goes through ``get_tensor``.
    """

    def __init__(
        self, get_tensor: Callable[[str], TensorData], locate: Locate | None = None
    ) -> None:
        self.get_tensor = get_tensor
        self.locate = locate
        self._locate_many = getattr(locate, "many", None)  # mapped_checkpoint.Locator
        self.problems: list[Mismatch] = []
        self.problem_paths: list[Path] = []  # where each of problems lies, unrendered
        #: objects in both the state and the checkpoint that nothing saved fits: even a
        #: non-strict restore refuses them (``tree.restore_state``)
        self.unmatched: list[Mismatch] = []
        self._data: dict[str, TensorData | None] = {}
        self.copies = HostCopies()  # what apply copies into host memory
        self._actions: list[Callable[[], None]] = []

    def problem(self, path: Path, text: str) -> None:
        self.problems.append(Mismatch(render(path), text))
        self.problem_paths.append(path)

    def plan(self, state: dict[str, Any], root: Any) -> None:
        """Check ``state`` against the tree's ``root`` and record what apply will do."""
        if self._restore(state, root, ROOT, "") is not None:
            raise MalformedTree("the state tree's root is not a dict")

    def apply(self) -> None:
        """Write everything planned: host copies (batched), then the rest in order."""
        self.copies.run()
        for action in self._actions:
            action()

    # --- the walk ----------------------------------------------------------------------

    def _restore(self, target: Any, node: Any, path: Path, name: str) -> Replacement | None:
        """Plan restoring ``node`` into ``target``; a Replacement if the container must change."""
        kind = kind_of(target)
        if kind is ARRAY:
            return self._restore_array(target, node, path, name)
        if kind is OBJECT:
            self._restore_object(target, node, path, name)
            return None
        saved_kind = node_kind(node)
        if kind is DICT:
            if path is not ROOT and saved_kind == "dict" and pure(target) and node_pure(node):
                # Python data only (counters a run fills in): the saved dict whole, its
                # keys as saved, like a list of Python values.
                return self._replace(target, node, path)
            self._restore_dict(target, node, path, name)
            return None
        replaceable = kind is VALUE or (
            kind is SEQUENCE and saved_kind in ("list", "tuple") and pure(target)
        )
        if replaceable and node_pure(node):
            return self._replace(target, node, path)
        if kind is SEQUENCE:
            return self._restore_sequence(target, node, saved_kind, path, name)
        if kind is UNSUPPORTED:
            self.problem(path, unsupported(target, path).removeprefix(render(path) + " "))
        else:
            self.problem(
                path, f"is a Python {type(target).__name__}, the checkpoint has {describe(node)}"
            )
        return None

    def _fetch(self, name: str, spec: ArraySpec, path: Path) -> TensorData | None:
        if name in self._data:
            return self._data[name]
        data: TensorData | None
        try:
            data = self.get_tensor(name)
        except (KeyError, errors.NotFoundError):
            data = None
            self.problem(path, f"is saved as tensor {name!r}, which the checkpoint's data lacks")
        else:
            try:
                expected = storage_spec(spec.dtype, spec.shape)
            except ValueError as e:
                raise MalformedTree(str(e)) from None
            if (data.dtype, tuple(data.shape)) != expected or data.buffer.nbytes != data.nbytes:
                self.problem(
                    path,
                    f"is saved as tensor {name!r} of {expected}, but the data holds "
                    f"{data.dtype} {tuple(data.shape)} in {data.buffer.nbytes} bytes",
                )
                data = None
        self._data[name] = data
        return data

    def _restore_array(self, target: Any, node: Any, path: Path, name: str) -> Replacement | None:
        if type(node) is not list:
            self.problem(path, f"is an array, the checkpoint has {describe(node)}")
            return None
        _, want = leaf_spec(node)
        adapter: ArrayAdapter = array_adapter_for(target)  # type: ignore[assignment]
        try:
            have = adapter.spec(target)
        except TypeError as e:
            self.problem(path, f"{e}")
            return None
        count = len(self.problems)
        if have.key_impl != want.key_impl:
            self.problem(path, _key_problem(have, want))
        elif have.dtype != want.dtype:
            self.problem(path, f"has dtype {have.dtype}, the checkpoint has {want.dtype}")
        if have.key_impl == want.key_impl and have.shape != want.shape:
            self.problem(
                path, f"has shape {list(have.shape)}, the checkpoint has {list(want.shape)}"
            )
        unwritable = adapter.writable_problem(target)
        if unwritable:
            self.problem(path, unwritable)
        data = self._fetch(leaf_tied(node, name), want, path)
        if data is None or len(self.problems) > count:
            return None
        view = adapter.host_view(target)
        if view is not None:
            self.copies.host.append((view, data))
            return None
        return lambda: adapter.restore(target, data, want)

    def _plan_ndarray(self, target: np.ndarray[Any, Any], node: Any, name: str) -> bool:
        """Plan the copy into a plain NumPy array that matches its node exactly; False
        (nothing recorded) for anything else, which the general path then handles."""
        if type(node) is not list or len(node) != 3 or name in self._data:
            return False
        _, dtype, shape = node
        code = GATHER_DTYPES.get(target.dtype)  # native byte order, stored as it is
        if code is None or code != dtype or type(shape) is not list:
            return False
        tshape = target.shape
        if len(shape) != len(tshape) or list(tshape) != shape or not target.flags.writeable:
            return False
        if self.locate is not None:
            try:
                saved_code, saved_shape, source, start, end = self.locate(name)
            except (KeyError, errors.NotFoundError):
                return False
            if saved_code != code or saved_shape != tshape:
                return False
            self.copies.located.append((target, source, start, end))
            return True
        if not target.flags.c_contiguous:
            # A flat uint8 view of strided memory would be a copy (or impossible): the
            # general path copies through the adapter instead.
            return False
        try:
            data = self.get_tensor(name)
        except (KeyError, errors.NotFoundError):
            return False
        buffer = data.buffer
        if data.dtype != code or data.shape != tshape or buffer.nbytes != target.nbytes:
            return False
        self._data[name] = data
        # A byte memoryview (the small-copy path) of a 0-d or empty array cannot be cast.
        if target.nbytes >= PARALLEL_COPY_BYTES or not target.ndim or not target.nbytes:
            self.copies.host.append((target.reshape(-1).view(np.uint8), data))
        else:
            self.copies.small.append((target, buffer))
        return True

    def _restore_object(self, target: Any, node: Any, path: Path, name: str) -> None:
        if node_kind(node) != "object":
            self.problem(
                path, f"is a {type(target).__qualname__}, the checkpoint has {describe(node)}"
            )
            return
        adapter = stateful_adapter_for(target)
        assert adapter is not None
        state_path = (path, STATE_DICT, None)
        count = len(self.problems)
        saved = self._construct(node["state"], state_path, name, build=False)
        if len(self.problems) > count:
            return  # its saved tensors are unreadable
        found = adapter.problems(target, saved)
        for key, text in found:
            self.problem(state_path if key is None else (state_path, KEY, key), text)
        whole = [text for key, text in found if key is None]
        if whole or (found and isinstance(saved, dict) and set(saved) <= {k for k, _ in found}):
            self.unmatched.append(Mismatch(render(path), _unmatched(target, saved, whole)))
            return
        in_place = getattr(adapter, "in_place", None)
        if in_place is not None and not found:
            targets = in_place(target, saved)
            if targets is not None and plan_in_place(
                self, targets, node["state"], state_path, name, _child_name
            ):
                finish = adapter.finish_in_place  # type: ignore[attr-defined]
                self._actions.append(lambda: finish(target, saved))
                return
        metadata = None
        if "metadata" in node:
            metadata = self._construct(node["metadata"], (path, METADATA, None), name, build=True)

        def load() -> None:
            state_dict = self._construct_parallel(node["state"], state_path, name)
            if found and isinstance(state_dict, dict):
                for key, _ in found:
                    state_dict.pop(key, None)
            if metadata is not None and isinstance(state_dict, dict):
                state_dict = OrderedDict(state_dict)
                state_dict._metadata = metadata  # type: ignore[attr-defined]
            adapter.load(target, state_dict, strict=not found)

        self._actions.append(load)

    def _restore_dict(self, target: dict[Any, Any], node: Any, path: Path, name: str) -> None:
        if node_kind(node) != "dict":
            self.problem(path, f"is a dict, the checkpoint has {describe(node)}")
            return
        prefix = f"{name}/" if name else ""
        keys, values = node.get("dict"), node.get("values")
        many = self._locate_many
        ok = many and len(target) > 1 and type(keys) is type(values) is list
        # fast path: plain arrays that all match exactly are checked as one run in C loops
        if ok and plan_run(self.copies, target, keys, values, prefix, many):  # type: ignore[arg-type]
            return
        saved = dict(dict_items(node))
        ndarray, codes_of, locate = np.ndarray, GATHER_DTYPES, self.locate
        located = self.copies.located
        for key, value in target.items():
            child = saved.get(key, saved)  # saved itself: a sentinel no node can be
            if child is saved:
                self.problem((path, KEY, key), "is missing from the checkpoint")
                continue
            child_name = prefix + key if type(key) is str else f"{prefix}{key}"
            if type(value) is ndarray:
                # fast path: _plan_ndarray inlined (a call per array: 14% slower on 100k arrays)
                if (
                    locate is not None
                    and type(child) is list
                    and len(child) == 3
                    and codes_of.get(value.dtype) == child[1]
                    and child[2] == list(value.shape)
                    and value.flags.writeable
                ):
                    try:
                        code, shape, source, start, end = locate(child_name)
                    except (KeyError, errors.NotFoundError):
                        pass
                    else:
                        if code == child[1] and shape == value.shape:
                            located.append((value, source, start, end))
                            continue
                elif self._plan_ndarray(value, child, child_name):
                    continue
            child_path = (path, KEY, key)
            replace = self._restore(value, child, child_path, child_name)
            if replace is not None:
                self._actions.append(_setter(target, key, value, replace))
        for key in saved:
            if key not in target:
                self.problem((path, KEY, key), "is in the checkpoint but not in the state")

    def _restore_dict_reference(
        self, target: dict[Any, Any], node: Any, path: Path, name: str
    ) -> None:
        """:meth:`_restore_dict` one key at a time through :meth:`_restore`, arrays through
        their adapters: the plain statement of it (a property test,
        ``tests/checkpoint/test_fast_paths_restore.py``, compares the two)."""
        if node_kind(node) != "dict":
            self.problem(path, f"is a dict, the checkpoint has {describe(node)}")
            return
        saved = dict(dict_items(node))
        for key, value in target.items():
            if key not in saved:
                self.problem((path, KEY, key), "is missing from the checkpoint")
                continue
            child_path = (path, KEY, key)
            replace = self._restore(value, saved[key], child_path, _child_name(name, key))
            if replace is not None:
                self._actions.append(_setter(target, key, value, replace))
        for key in saved:
            if key not in target:
                self.problem((path, KEY, key), "is in the checkpoint but not in the state")

    def _restore_sequence(
        self, target: Any, node: Any, saved_kind: str, path: Path, name: str
    ) -> Replacement | None:
        kind = type(target).__name__
        if saved_kind not in ("list", "tuple"):
            self.problem(path, f"is a {kind}, the checkpoint has {describe(node)}")
            return None
        items = sequence_items(node, saved_kind)
        if len(items) != len(target):
            self.problem(path, f"has {len(target)} items, the checkpoint has {len(items)}")
            return None
        replacements = [
            self._restore(value, child, (path, KEY, i), _child_name(name, i))
            for i, (value, child) in enumerate(zip(target, items))
        ]
        if isinstance(target, list):
            for i, replace in enumerate(replacements):
                if replace is not None:
                    self._actions.append(_setter(target, i, target[i], replace))
            return None
        if all(r is None for r in replacements):
            return None

        def rebuild() -> Any:
            new = [old if r is None else r() for old, r in zip(target, replacements)]
            changed = any(n is not o for n, o in zip(new, target))
            return _rebuild_tuple(target, new) if changed else target

        return rebuild

    def _replace(self, target: Any, node: Any, path: Path) -> Replacement:
        new = self._construct(node, path, "", build=True)  # pure: no arrays, cheap

        def replacement() -> Any:
            if isinstance(target, list) and isinstance(new, list):
                target[:] = new  # keep the caller's list object
                return target
            if isinstance(target, dict) and isinstance(new, dict):
                return _assign_dict(target, new)
            if isinstance(target, tuple) and isinstance(new, tuple) and len(new) == len(target):
                return _rebuild_tuple(target, list(new))  # keep a namedtuple's type
            return new

        return replacement

    def _construct_parallel(self, node: Any, path: Path, name: str) -> Any:
        """:meth:`_construct` with ``build=True``, the large arrays built on a few threads
        (their copies out of the checkpoint release the GIL): a module's and an
        optimizer's state dicts are mostly a few large tensors."""
        with ThreadPoolExecutor(_BUILD_THREADS, thread_name_prefix="trainhooks-build") as pool:
            built = self._construct(node, path, name, build=True, pool=pool)
            return _resolved(built)

    def _construct(
        self,
        node: Any,
        path: Path,
        name: str,
        *,
        build: bool,
        pool: ThreadPoolExecutor | None = None,
    ) -> Any:
        """The saved value of ``node``: arrays built (``build``) or as :class:`ArraySpec`.

        With ``pool``, large arrays are built there and stand as futures in the result
        (:func:`_resolved` replaces them).
        """
        kind = node_kind(node)
        if kind == "tensor":
            framework, spec = leaf_spec(node)
            data = self._fetch(leaf_tied(node, name), spec, path)
            if not build or data is None:
                return spec
            adapter = array_adapter_named(framework)
            if pool is not None and data.buffer.nbytes >= PARALLEL_COPY_BYTES:
                return pool.submit(adapter.build, data, spec)
            return adapter.build(data, spec)
        if kind == "object":
            return self._construct(
                node["state"], (path, STATE_DICT, None), name, build=build, pool=pool
            )
        if kind == "dict":
            return {
                key: self._construct(
                    child, (path, KEY, key), _child_name(name, key), build=build, pool=pool
                )
                for key, child in dict_items(node)
            }
        if kind in ("list", "tuple"):
            items = [
                self._construct(child, (path, KEY, i), _child_name(name, i), build=build, pool=pool)
                for i, child in enumerate(sequence_items(node, kind))
            ]
            return items if kind == "list" else tuple(items)
        try:
            return pyvalues.decode_value(dict(node))
        except (KeyError, TypeError, ValueError) as e:
            raise MalformedTree(f"a value node {str(node)[:80]} is malformed ({e})") from None


def _resolved(value: Any) -> Any:
    """``value`` with every future in its dicts, lists and tuples replaced by its result."""
    if isinstance(value, Future):
        return value.result()
    if type(value) is dict:
        for key, item in value.items():
            if isinstance(item, (Future, dict, list, tuple)):
                value[key] = _resolved(item)
        return value
    if type(value) is list:
        value[:] = [_resolved(item) for item in value]
        return value
    if type(value) is tuple:
        return tuple(_resolved(item) for item in value)
    return value


def _assign_dict(target: dict[Any, Any], new: dict[Any, Any]) -> dict[Any, Any]:
    """Make ``target`` hold ``new``'s items, in its order, keeping the caller's dicts (a
    ``Counter``, a ``defaultdict`` and the dicts inside it) where both have one."""
    items = {
        key: _assign_dict(target[key], value)
        if isinstance(value, dict) and isinstance(target.get(key), dict)
        else value
        for key, value in new.items()
    }
    target.clear()
    target.update(items)
    return target


def _key_problem(have: ArraySpec, want: ArraySpec) -> str:
    if want.key_impl is None:
        return (
            f"is a JAX key array ({have.key_impl}), the checkpoint has a {want.dtype} array "
            f"of shape {list(want.shape)}: restore into the array it was (for an old-style "
            "jax.random.PRNGKey, a uint32 array), or wrap the saved key data with "
            "jax.random.wrap_key_data after restoring"
        )
    if have.key_impl is None:
        return (
            f"is a {have.dtype} array, the checkpoint has a typed JAX key "
            f"({want.key_impl}): restore into a key array, e.g. jax.random.key(0, "
            f"impl={want.key_impl!r})"
        )
    return f"is a JAX key array of {have.key_impl}, the checkpoint has {want.key_impl} keys"


def _sample(keys: Any) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:4])
    return f"[{shown}{', ...' if len(keys) > 4 else ''}] ({len(keys)} keys)"


def _unmatched(target: Any, saved: Any, whole: list[str]) -> str:
    cls = type(target).__qualname__
    if whole:
        return f"({cls}) fits nothing the checkpoint holds for it: {'; '.join(whole)}"
    try:
        have = _sample(target.state_dict())
    except Exception:  # only for the message: never fail on it
        have = "its state dict"
    return (
        f"({cls}) matches none of the checkpoint's keys: it has {have}, the checkpoint "
        f"{_sample(saved)}"
    )


def _setter(container: Any, key: Any, old: Any, replace: Replacement) -> Callable[[], None]:
    def action() -> None:
        new = replace()
        if new is not old:
            container[key] = new

    return action
