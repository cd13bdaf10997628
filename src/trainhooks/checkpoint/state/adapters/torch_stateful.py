"""``torch.nn.Module`` and ``torch.optim.Optimizer``: state dicts checked before loading.

A module knows every key and shape it expects and an optimizer its parameter groups, so
a mismatch is found while nothing has been loaded yet and reported together with every
other problem of the restore.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from trainhooks.checkpoint.state.adapters.base import ArraySpec

__all__ = ["ModuleAdapter", "OptimizerAdapter"]


def _torch_isinstance(value: object, dotted: str) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    cls: Any = torch
    for part in dotted.split("."):
        cls = getattr(cls, part)
    return isinstance(value, cls)


class ModuleAdapter:
    """:class:`~trainhooks.checkpoint.state.adapters.base.StatefulAdapter` for ``torch.nn.Module``:
    keys must match exactly and every saved tensor must have the parameter's shape."""

    def owns(self, value: object) -> bool:
        return _torch_isinstance(value, "nn.Module")

    def problems(self, obj: Any, saved: Any) -> list[tuple[Any, str]]:
        if not isinstance(saved, Mapping):
            return [(None, f"the checkpoint holds a {type(saved).__name__}, not a state dict")]
        import torch

        expected = obj.state_dict()
        found: list[tuple[Any, str]] = []
        for key, value in expected.items():
            if key not in saved:
                found.append((key, "missing from the checkpoint"))
                continue
            entry = saved[key]
            if not isinstance(value, torch.Tensor):
                continue
            if not isinstance(entry, ArraySpec):
                found.append((key, f"is a tensor, the checkpoint holds a {type(entry).__name__}"))
            elif entry.shape != tuple(value.shape):
                found.append(
                    (key, f"has shape {list(value.shape)}, the checkpoint has {list(entry.shape)}")
                )
        found.extend(
            (key, "is in the checkpoint but not in the module")
            for key in saved
            if key not in expected
        )
        return found

    def load(self, obj: Any, state_dict: Any, *, strict: bool) -> None:
        obj.load_state_dict(state_dict, strict=strict)

    def in_place(self, obj: Any, saved: Any) -> dict[tuple[Any, ...], Any] | None:
        """The module's own tensors for ``saved``'s keys (``state/tree_in_place.py``), or
        None when its ``load_state_dict`` may do more than copy: load hooks, a class
        with its own loading, extra state, tensor subclasses, keys that differ."""
        import torch

        if not isinstance(saved, Mapping) or not _loads_by_copying(obj):
            return None
        current = obj.state_dict()
        if set(current) != set(saved):
            return None
        targets: dict[tuple[Any, ...], Any] = {}
        for key, value in current.items():
            if type(value) is not torch.Tensor:
                return None
            targets[(key,)] = value  # shares the parameter's or buffer's storage
        return targets

    def finish_in_place(self, obj: Any, saved: Any) -> None:
        """Nothing: a module's state dict is its tensors, all copied already."""


class OptimizerAdapter:
    """:class:`~trainhooks.checkpoint.state.adapters.base.StatefulAdapter` for ``torch.optim.Optimizer``:
    the saved parameter groups must have the optimizer's number of groups and parameters."""

    def owns(self, value: object) -> bool:
        return _torch_isinstance(value, "optim.Optimizer")

    def problems(self, obj: Any, saved: Any) -> list[tuple[Any, str]]:
        groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
        if not isinstance(groups, (list, tuple)):
            return [(None, "the checkpoint holds no optimizer state dict ('param_groups')")]
        have = [len(g["params"]) for g in obj.param_groups]
        try:
            got = [len(g["params"]) for g in groups]
        except (TypeError, KeyError):
            return [(None, "the checkpoint's parameter groups have no 'params' lists")]
        if have != got:
            # Not a key to leave out: an optimizer loads its state whole or not at all.
            return [
                (
                    None,
                    f"the optimizer has parameter groups of sizes {have}, the checkpoint {got}: "
                    "build the optimizer over the same parameters as the saved run",
                )
            ]
        return []

    def load(self, obj: Any, state_dict: Any, *, strict: bool) -> None:
        obj.load_state_dict(state_dict)

    def in_place(self, obj: Any, saved: Any) -> dict[tuple[Any, ...], Any] | None:
        """The optimizer's own state tensors for ``saved`` (``state/tree_in_place.py``),
        or None unless every parameter has state of the saved keys already (an optimizer
        that has stepped), the hyperparameters are Python values and loading has no hooks.
        """
        import torch

        from trainhooks.checkpoint.state.adapters.base import ArraySpec

        if (
            type(obj).load_state_dict is not torch.optim.Optimizer.load_state_dict
            or obj._optimizer_load_state_dict_pre_hooks
            or obj._optimizer_load_state_dict_post_hooks
            or not isinstance(saved, Mapping)
            or not isinstance(saved.get("state"), Mapping)
        ):
            return None
        groups = saved["param_groups"]
        for group, live in zip(groups, obj.param_groups):
            if any(isinstance(v, ArraySpec) for k, v in group.items() if k != "params"):
                return None
            if set(group) != set(live):
                return None  # load_state_dict drops the keys the checkpoint lacks
        params = [p for group in obj.param_groups for p in group["params"]]
        saved_ids = [i for group in groups for i in group["params"]]
        saved_state = saved["state"]
        if len(saved_ids) != len(params) or set(saved_state) - set(saved_ids):
            return None
        targets: dict[tuple[Any, ...], Any] = {}
        for index, param in zip(saved_ids, params):
            have, want = obj.state.get(param), saved_state.get(index)
            if not have and not want:
                continue
            if not have or not want or set(have) != set(want):
                return None
            for key, value in have.items():
                if isinstance(value, torch.Tensor):
                    if type(value) is not torch.Tensor or not isinstance(want[key], ArraySpec):
                        return None
                    targets[("state", index, key)] = value
                elif isinstance(want[key], ArraySpec):
                    return None
        return targets

    def finish_in_place(self, obj: Any, saved: Any) -> None:
        """Set the saved Python state values and hyperparameters (the tensors are copied)."""
        from trainhooks.checkpoint.state.adapters.base import ArraySpec

        groups = saved["param_groups"]
        params = [p for group in obj.param_groups for p in group["params"]]
        saved_ids = [i for group in groups for i in group["params"]]
        for index, param in zip(saved_ids, params):
            for key, value in (saved["state"].get(index) or {}).items():
                if not isinstance(value, ArraySpec):
                    obj.state[param][key] = value
        for group, saved_group in zip(obj.param_groups, groups):
            for key, value in saved_group.items():
                if key != "params":
                    group[key] = value


def _loads_by_copying(module: Any) -> bool:
    """Whether ``load_state_dict`` of ``module`` only copies each tensor into its own."""
    import torch

    plain = {torch.nn.Module._load_from_state_dict}
    norm = getattr(torch.nn.modules.batchnorm, "_NormBase", None)
    if norm is not None:  # only adds num_batches_tracked to state dicts of old versions
        plain.add(norm._load_from_state_dict)
    for m in module.modules():
        cls = type(m)
        if (
            m._load_state_dict_pre_hooks
            or m._load_state_dict_post_hooks
            or m._state_dict_hooks
            or m._state_dict_pre_hooks
            or cls._load_from_state_dict not in plain
            or cls.get_extra_state is not torch.nn.Module.get_extra_state
        ):
            return False
    return True
