"""Restoring a module's or an optimizer's state into the tensors it already has.

``load_state_dict`` takes new tensors: a restore through it builds a copy of every saved
tensor, then the module copies each into its parameter (two copies), or the optimizer
keeps the new ones (its old state tensors freed, new ones allocated). When an object's
tensors already have the saved shapes and dtypes and loading would do nothing else (no
load hooks, no custom loading, no extra state), the restore copies the saved bytes
straight into them instead, as it does for a plain tensor of the state, and the adapter
sets the object's few Python values (an optimizer's hyperparameters) itself.

An adapter offers it with two methods beside ``load``:

* ``in_place(obj, saved) -> {key path: tensor} | None``: the object's own tensors for
  every tensor of ``saved`` (the saved state dict with an ``ArraySpec`` per tensor),
  keyed by the path of keys into the state dict; None when ``load_state_dict`` must run;
* ``finish_in_place(obj, saved)``: after the copies, set what is not a tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from trainhooks.checkpoint.state.adapters import array_adapter_for
from trainhooks.checkpoint.state.tree_nodes import KEY, Path, dict_items, leaf_spec, node_kind

if TYPE_CHECKING:
    from trainhooks.checkpoint.state.tree_restore import Restorer

__all__ = ["plan_in_place"]

#: A path of keys into a state dict: ``("weight",)``, ``("state", 0, "exp_avg")``.
KeyPath = tuple[Any, ...]


def plan_in_place(
    restorer: Restorer,
    targets: dict[KeyPath, Any],
    state_node: Any,
    path: Path,
    name: str,
    child_name: Callable[[str, object], str],
) -> bool:
    """Plan copying each saved tensor of ``state_node`` into its target; False (nothing
    planned) unless every target has its saved tensor's exact spec."""
    leaves: list[tuple[Any, Any, Path, str]] = []
    for keys, tensor in targets.items():
        node, leaf_path, leaf_name = state_node, path, name
        for key in keys:
            if node_kind(node) != "dict":
                return False
            children = dict(dict_items(node))
            if key not in children:
                return False
            node, leaf_path, leaf_name = (
                children[key],
                (leaf_path, KEY, key),
                child_name(leaf_name, key),
            )
        if node_kind(node) != "tensor":
            return False
        adapter = array_adapter_for(tensor)
        if adapter is None:
            return False
        want = leaf_spec(node)[1]
        try:
            have = adapter.spec(tensor)
            if adapter.writable_problem(tensor):
                return False
        except TypeError:
            return False
        # The device is where the tensor lives now; a copy puts the bytes there.
        if (have.dtype, have.shape, have.key_impl) != (want.dtype, want.shape, want.key_impl):
            return False
        leaves.append((tensor, node, leaf_path, leaf_name))
    for tensor, node, leaf_path, leaf_name in leaves:
        action = restorer._restore_array(tensor, node, leaf_path, leaf_name)
        if action is not None:
            restorer._actions.append(action)
    return True
