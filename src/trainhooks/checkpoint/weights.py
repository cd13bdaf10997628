"""One state entry as a plain ``state_dict`` of torch tensors, and a state's Python values.

For using a checkpoint's weights without a session or a state to restore into: for
inference, fine-tuning in another program, or exporting. The manifest records the state
as a JSON tree (``state/tree.py``): where each tensor sits, the keys of every dict and
every value that is not an array (an epoch, a learning rate, a scheduler's counters).
:func:`load_state_dict` rebuilds one entry from it, with torch tensors of the dtype they
were saved with (bfloat16, float8, complex, bool, ...), bit for bit; :func:`load_values`
returns the Python values of the state by name.

Every tensor read is checksummed first, as :func:`~trainhooks.load_variable` does.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from trainhooks.checkpoint.format.dtypes import storage_spec, tensor_data_to_torch, torch_dtype
from trainhooks.checkpoint.format.opening import MappedCheckpoint, open_checkpoint
from trainhooks.checkpoint.reader import checkpoint_prefix
from trainhooks.checkpoint.state.adapters import ArraySpec
from trainhooks.checkpoint.state.adapters import python as pyvalues
from trainhooks.checkpoint.state.tree import READABLE_TREE_VERSIONS
from trainhooks.checkpoint.state.tree_nodes import (
    MalformedTree,
    dict_items,
    leaf_spec,
    leaf_tied,
    node_kind,
    node_pure,
    sequence_items,
)
from trainhooks.errors import NotFoundError

__all__ = [
    "DEFAULT_STRIP_PREFIX",
    "load_state_dict",
    "load_values",
    "state_values",
]

#: What ``DistributedDataParallel`` (``module.``) and ``torch.compile`` (``_orig_mod.``)
#: put in front of every key of a wrapped module's state dict.
DEFAULT_STRIP_PREFIX = ("module.", "_orig_mod.")

#: Reads the tensor at a tensor node: ``(node, its name, its spec) -> tensor``.
ReadTensor = Callable[[Any, str, ArraySpec], Any]


def load_state_dict(
    ckpt_dir_or_file: str | os.PathLike[str],
    entry: str | None = "model",
    *,
    strip_prefix: str | Sequence[str] | None = DEFAULT_STRIP_PREFIX,
    device: Any = "cpu",
) -> dict[Any, Any]:
    """One entry of a checkpoint's state as it was saved, with torch tensors; no session needed.

    For a module that is its ``state_dict()`` (keys to tensors, loadable with
    ``module.load_state_dict``); for an optimizer, a scheduler or any object with
    ``state_dict()``, its state dict with the Python values it held (step counters,
    learning rates, epochs); for a dict of arrays, that dict. Every array comes back as a
    new torch tensor of the dtype it was saved with, bit for bit, whichever framework
    saved it (NumPy and ``ml_dtypes`` arrays included: bfloat16, float8, complex, bool,
    0-d, empty).

    Args:
      ckpt_dir_or_file: a checkpoint prefix (``"ckpt/model.ckpt-200"``), or a directory
        whose state file names the latest checkpoint (``"ckpt"``).
      entry: the state entry: a key of the saved state (``"model"``), or a ``/``-joined
        path into it, named as tensors are (``"models/generator"``); None for the
        whole state.
      strip_prefix: prefixes removed from the keys of the returned dict when every key
        starts with one: by default ``"module."`` (a model wrapped in
        ``DistributedDataParallel``) and ``"_orig_mod."`` (``torch.compile``), so the
        weights load into the plain model. Also removed from the module names of its
        ``_metadata``. None or ``()`` keeps the keys as saved.
      device: where the tensors are put (default the CPU, whatever they were saved on).

    Returns:
      A dict (a ``collections.OrderedDict`` carrying ``_metadata`` for a module, as
      ``Module.state_dict()`` returns); nested dicts, lists and tuples as saved.

    Raises:
      NotFoundError: nothing at the path, or the checkpoint has no entry ``entry`` (the
        message lists the entries).
      TypeError: the entry is a single tensor or Python value, not a state dict (read it
        with :func:`~trainhooks.load_variable` or :func:`load_values`).
      ValueError: a directory without checkpoints, or a checkpoint whose state tree is of
        another version.
      DataLossError: the checkpoint is corrupt.

    Example:
        >>> import os, tempfile
        >>> import torch, trainhooks as th
        >>> model = torch.nn.Linear(3, 2, dtype=torch.bfloat16)
        >>> sess = th.Session({"model": model, "epoch": 4})
        >>> saver = th.Saver()
        >>> run_dir = tempfile.mkdtemp()
        >>> prefix = saver.save(sess, os.path.join(run_dir, "model.ckpt"), global_step=1)
        >>> saver.close()
        >>> weights = th.load_state_dict(prefix)
        >>> sorted(weights), weights["weight"].dtype
        (['bias', 'weight'], torch.bfloat16)
        >>> torch.equal(weights["weight"], model.weight.detach())
        True
        >>> torch.nn.Linear(3, 2, dtype=torch.bfloat16).load_state_dict(weights)
        <All keys matched successfully>
    """
    with open_checkpoint(checkpoint_prefix(ckpt_dir_or_file)) as ckpt:
        node, name = _entry_node(ckpt.tree, entry, ckpt.prefix)
        kind = node_kind(node)
        if kind not in ("dict", "object"):
            what = "a tensor" if kind == "tensor" else f"a Python {kind}"
            hint = (
                f"load_variable(ckpt, {name!r})"
                if kind == "tensor"
                else f"load_values(ckpt, {name!r})"
            )
            raise TypeError(
                f"Entry {name!r} of checkpoint {ckpt.prefix} is {what}, not a state dict: "
                f"read it with {hint}."
            )
        try:
            state = _rebuild(node, name, _torch_reader(ckpt, device))
        except MalformedTree as e:
            raise MalformedTree(f"Checkpoint {ckpt.prefix}: {e}") from None
    if not isinstance(state, dict):  # an object whose state_dict() is not a dict
        raise TypeError(
            f"Entry {name!r} of checkpoint {ckpt.prefix} saved a {type(state).__name__} as its "
            f"state, not a dict: read its values with load_values(ckpt, {name!r})."
        )
    return _strip(state, _prefixes(strip_prefix))


def load_values(
    ckpt_dir_or_file: str | os.PathLike[str], entry: str | None = None
) -> dict[str, Any]:
    """The Python values of a checkpoint's state (everything that is not an array), by name.

    Names are those tensors have (``"scheduler/last_epoch"``, ``"optimizer/param_groups"``,
    ``"epoch"``): dict keys and list indices joined with ``/``. A list or tuple holding
    only Python values is one value, as a restore replaces it whole. Tensors are left
    out (see :func:`~trainhooks.list_variables`), and so is the ``_metadata`` torch keeps
    beside a module's state dict.

    Args:
      ckpt_dir_or_file: a checkpoint prefix, or a directory (its latest checkpoint).
      entry: only the values of this state entry (a key or a ``/``-joined path, as in
        :func:`load_state_dict`); None for the whole state.

    Returns:
      ``{name: value}`` in the order of the state; values are bool, int, float, str,
      bytes, None, or lists, tuples and dicts of these.

    Raises:
      NotFoundError: nothing at the path, or the checkpoint has no entry ``entry``.
      ValueError: a directory without checkpoints, or a checkpoint whose state tree is of
        another version.
      DataLossError: the checkpoint is corrupt.

    Example:
        >>> import os, tempfile
        >>> import numpy as np, trainhooks as th
        >>> state = {"w": np.zeros(2), "epoch": 3, "config": {"lr": 0.1, "layers": [4, 4]}}
        >>> saver = th.Saver()
        >>> prefix = saver.save(th.Session(state), os.path.join(tempfile.mkdtemp(), "m"), 7)
        >>> saver.close()
        >>> th.load_values(prefix)
        {'epoch': 3, 'config/lr': 0.1, 'config/layers': [4, 4]}
    """
    with open_checkpoint(checkpoint_prefix(ckpt_dir_or_file)) as ckpt:
        return state_values(ckpt.tree, entry, prefix=ckpt.prefix)


def state_values(tree: object, entry: str | None = None, *, prefix: str = "") -> dict[str, Any]:
    """:func:`load_values` of a state tree (a manifest's ``tree``), for a checkpoint already open.

    Args:
      tree: the tree ``tree.flatten_state`` made.
      entry: as in :func:`load_values`.
      prefix: the checkpoint's path, for messages.

    Raises:
      NotFoundError: no entry ``entry``.
      ValueError: a tree of another version.
      MalformedTree: the tree is not one ``flatten_state`` writes.

    Example:
        >>> from trainhooks.checkpoint.state.tree import flatten_state
        >>> state_values(flatten_state({"step": 2, "lrs": (0.1, 0.01)}).tree)
        {'step': 2, 'lrs': (0.1, 0.01)}
    """
    node, name = _entry_node(tree, entry, prefix)
    found: dict[str, Any] = {}
    try:
        _collect_values(node, name, found)
    except MalformedTree as e:
        raise MalformedTree(f"{_checkpoint(prefix)}: {e}") from None
    return found


# --- the walks ---------------------------------------------------------------------------


def _child_name(name: str, key: Any) -> str:
    """The name of a dict's entry or a list's item, as ``tree_flatten.Flattener`` gives it."""
    return f"{name}/{key}" if name else str(key)


def _children(node: Any, kind: str) -> list[tuple[Any, Any]]:
    if kind == "dict":
        return dict_items(node)
    return list(enumerate(sequence_items(node, kind)))


def _object_state(node: Mapping[str, Any]) -> Any:
    if "state" not in node:
        raise MalformedTree("an object node has no state")
    return node["state"]


def _python_value(node: Any) -> Any:
    try:
        return pyvalues.decode_value(node)
    except (KeyError, TypeError, ValueError):
        raise MalformedTree(f"the state tree holds a malformed value {str(node)[:80]}") from None


def _rebuild(node: Any, name: str, read: ReadTensor) -> Any:
    """The value saved at ``node``, with each array read by ``read``."""
    kind = node_kind(node)
    if kind == "tensor":
        return read(node, name, leaf_spec(node)[1])
    if kind == "dict":
        return {
            key: _rebuild(child, _child_name(name, key), read) for key, child in dict_items(node)
        }
    if kind in ("list", "tuple"):
        items = [
            _rebuild(child, _child_name(name, i), read)
            for i, child in enumerate(sequence_items(node, kind))
        ]
        return items if kind == "list" else tuple(items)
    if kind == "object":
        state = _rebuild(_object_state(node), name, read)
        metadata = node.get("metadata")
        if isinstance(state, dict) and metadata is not None:
            state = collections.OrderedDict(state)
            state._metadata = _rebuild(metadata, name, _no_tensor)  # type: ignore[attr-defined]
        return state
    return _python_value(node)


def _no_tensor(node: Any, name: str, spec: ArraySpec) -> Any:
    raise MalformedTree(
        f"a part of the state tree that holds only Python values has a tensor {name!r}"
    )


def _collect_values(node: Any, name: str, found: dict[str, Any]) -> None:
    kind = node_kind(node)
    if kind == "tensor":
        return
    if kind == "object":  # its metadata is torch's bookkeeping, not the user's values
        _collect_values(_object_state(node), name, found)
    elif kind in ("list", "tuple") and node_pure(node):
        found[name] = _rebuild(node, name, _no_tensor)
    elif kind in ("dict", "list", "tuple"):
        for key, child in _children(node, kind):
            _collect_values(child, _child_name(name, key), found)
    else:
        found[name] = _python_value(node)


def _find(node: Any, name: str, entry: str) -> Any | None:
    """The node named ``entry`` at or under ``node`` (named ``name``), or None.

    An object and its state dict share a name; the object is found.
    """
    if name == entry:
        return node
    kind = node_kind(node)
    if kind == "object":
        return _find(_object_state(node), name, entry)
    if kind not in ("dict", "list", "tuple"):
        return None
    for key, child in _children(node, kind):
        child_name = _child_name(name, key)
        if entry == child_name or entry.startswith(child_name + "/"):
            found = _find(child, child_name, entry)
            if found is not None:
                return found
    return None


def _checkpoint(prefix: str) -> str:
    return f"Checkpoint {prefix}" if prefix else "The checkpoint"


def _entry_node(tree: object, entry: str | None, prefix: str) -> tuple[Any, str]:
    """The tree node of state entry ``entry`` (the root for None) and its name."""
    version = tree.get("version") if isinstance(tree, Mapping) else None
    if not isinstance(tree, Mapping) or version not in READABLE_TREE_VERSIONS:
        raise ValueError(
            f"{_checkpoint(prefix)} has a state tree of version {version!r}; this version of "
            f"trainhooks reads versions {', '.join(map(str, READABLE_TREE_VERSIONS))}. Read "
            "its tensors with load_variable."
        )
    root = tree.get("root")
    try:
        if entry is None:
            node_kind(root)
            return root, ""
        node = _find(root, "", entry)
        if node is None:
            top = (
                [_child_name("", key) for key, _ in dict_items(root)] if type(root) is dict else []
            )
            raise NotFoundError(
                f"{_checkpoint(prefix)} has no state entry {entry!r}; its entries are "
                f"{', '.join(repr(t) for t in top) or 'none'}. Pass one of them, or a "
                "'/'-joined path into one."
            )
    except MalformedTree as e:
        raise MalformedTree(f"{_checkpoint(prefix)}: {e}") from None
    return node, entry


# --- tensors -----------------------------------------------------------------------------


def _torch_reader(ckpt: MappedCheckpoint, device: Any) -> ReadTensor:
    """Reads a tensor of ``ckpt`` as a new torch tensor on ``device``, checksummed first.

    Tied arrays come back as one tensor under each name, as the state dict held them.
    """
    import torch

    target = torch.device(device)
    stored = ckpt.manifest.tensors
    read_already: dict[str, Any] = {}

    def read(node: Any, name: str, spec: ArraySpec) -> Any:
        source = leaf_tied(node, name)
        if source in read_already:
            return read_already[source]
        if source not in stored and source not in ckpt.manifest.sharded:
            raise MalformedTree(f"the state tree names tensor {source!r}, which is not stored")
        data = ckpt.tensor_data(source)
        try:
            expected = storage_spec(spec.dtype, spec.shape)
        except ValueError:
            raise MalformedTree(f"tensor {name!r} has an unknown dtype {spec.dtype!r}") from None
        if (data.dtype, data.shape) != expected:
            raise MalformedTree(
                f"tensor {source!r} is stored as {data.dtype} {list(data.shape)}, but the "
                f"state tree says {spec.dtype} {list(spec.shape)}"
            )
        tensor = tensor_data_to_torch(data, torch_dtype(spec.dtype), spec.shape)
        if target.type != "cpu":
            tensor = tensor.to(target)
        read_already[source] = tensor
        return tensor

    return read


# --- prefixes ----------------------------------------------------------------------------


def _prefixes(strip_prefix: str | Sequence[str] | None) -> tuple[str, ...]:
    if strip_prefix is None:
        return ()
    if isinstance(strip_prefix, str):
        return (strip_prefix,) if strip_prefix else ()
    return tuple(p for p in strip_prefix if p)


def _strip(state: dict[Any, Any], prefixes: tuple[str, ...]) -> dict[Any, Any]:
    """``state`` without the first of ``prefixes`` that every key starts with, repeatedly.

    Only a prefix on every key is a wrapper's (a model with a submodule called ``module``
    beside others keeps its keys); torch's ``consume_prefix_in_state_dict_if_present``
    renames ``_metadata`` the same way.
    """
    while state and all(type(k) is str for k in state):
        prefix = next((p for p in prefixes if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        renamed: dict[Any, Any] = type(state)((k[len(prefix) :], v) for k, v in state.items())
        metadata = getattr(state, "_metadata", None)
        if isinstance(metadata, dict):
            module = prefix[:-1] if prefix.endswith(".") else prefix
            new_metadata: dict[Any, Any] = collections.OrderedDict()
            for key, value in metadata.items():
                if type(key) is str and (key == module or key.startswith(prefix)):
                    key = key[len(prefix) :]
                new_metadata[key] = value
            renamed._metadata = new_metadata  # type: ignore[attr-defined]
        state = renamed
    return state
