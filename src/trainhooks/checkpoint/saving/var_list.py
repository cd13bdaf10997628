"""``var_list``: which part of a session's state a ``Saver`` saves and restores.

TF's ``Saver(var_list=...)`` names the variables it saves. Without a graph, a saver
saves ``session.state`` (no ``var_list``), a mapping of its own (a dict of names to
values, saved instead of the session's state), or some entries of the session's state
(a list of its keys). :class:`VarList` checks the argument once and answers the two
questions a save and a restore ask: which mapping to flatten, and how to put entries a
restore replaced back into the session.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

__all__ = ["StateHolder", "VarList"]


class StateHolder(Protocol):
    """What a Saver saves from and restores into: the raw ``Session`` is one."""

    @property
    def state(self) -> dict[str, Any]: ...

    @property
    def global_step(self) -> int: ...

    @global_step.setter
    def global_step(self, value: int) -> None: ...


class VarList:
    """A checked ``var_list``: None, a dict of names to values, or a list of state keys.

    Args:
      var_list: None for the whole ``session.state``; a mapping of names to values to
        save instead of the session's state; or a list of keys of ``session.state``.

    Raises:
      TypeError: a key is not a string, or ``var_list`` is neither a mapping nor a list.

    Example:
        >>> import numpy as np
        >>> from trainhooks.session.session import Session
        >>> sess = Session({"model": np.zeros(2), "scratch": np.ones(1)})
        >>> sorted(VarList(["model"]).state_of(sess))
        ['model']
    """

    def __init__(self, var_list: Mapping[str, Any] | Sequence[str] | None) -> None:
        self._spec = _check_var_list(var_list)

    @property
    def is_empty(self) -> bool:
        """True for an empty dict or list: a saver with nothing to save."""
        return self._spec is not None and len(self._spec) == 0

    def state_of(self, session: StateHolder) -> dict[str, Any]:
        """The mapping to save from, or restore into, for ``session``.

        Raises:
          KeyError: a listed key is not in ``session.state``; the message lists its keys.
        """
        if self._spec is None:
            return session.state
        if isinstance(self._spec, dict):
            return self._spec
        state = session.state
        missing = [k for k in self._spec if k not in state]
        if missing:
            raise KeyError(
                f"Saver(var_list=...) names {missing}, which the session's state does not "
                f"hold; its entries are {sorted(state)}."
            )
        return {k: state[k] for k in self._spec}

    def write_back(self, session: StateHolder, restored: dict[str, Any]) -> None:
        """After a restore into :meth:`state_of`'s mapping, update the session's state.

        Arrays are restored in place either way; entries a restore replaces (Python
        scalars, JAX arrays) must go back into ``session.state`` when ``state_of``
        returned a copy, which it does for a list of keys.
        """
        if isinstance(self._spec, list):
            session.state.update(restored)


def _check_var_list(
    var_list: Mapping[str, Any] | Sequence[str] | None,
) -> dict[str, Any] | list[str] | None:
    if var_list is None:
        return None
    if isinstance(var_list, Mapping):
        bad = [k for k in var_list if not isinstance(k, str)]
        if bad:
            raise TypeError(f"var_list keys must be strings (entry names), got {bad!r}.")
        return var_list if isinstance(var_list, dict) else dict(var_list)
    if isinstance(var_list, (str, bytes)) or not isinstance(var_list, Sequence):
        raise TypeError(
            f"var_list must be a dict of names to values or a list of state keys, got "
            f"{type(var_list).__name__}."
        )
    bad = [k for k in var_list if not isinstance(k, str)]
    if bad:
        raise TypeError(
            f"var_list as a list must hold keys of session.state (strings), got {bad!r}; "
            "pass a dict of names to values to save other objects."
        )
    return list(var_list)
