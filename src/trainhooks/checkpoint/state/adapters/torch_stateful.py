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
