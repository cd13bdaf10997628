"""Any object with ``state_dict()`` and ``load_state_dict()``: the fallback adapter."""

from __future__ import annotations

from typing import Any

__all__ = ["GenericStatefulAdapter"]


class GenericStatefulAdapter:
    """:class:`~trainhooks.checkpoint.state.adapters.base.StatefulAdapter` for any object with
    ``state_dict()``/``load_state_dict()`` (LR schedulers, grad scalers, user classes).

    It cannot know what the object expects, so it checks nothing in advance; the object's
    own ``load_state_dict`` raises if it cannot take the saved state.
    """

    def owns(self, value: object) -> bool:
        return (
            not isinstance(value, type)
            and callable(getattr(value, "state_dict", None))
            and callable(getattr(value, "load_state_dict", None))
        )

    def problems(self, obj: Any, saved: Any) -> list[tuple[Any, str]]:
        return []

    def load(self, obj: Any, state_dict: Any, *, strict: bool) -> None:
        obj.load_state_dict(state_dict)
