"""The raw session: the training state, the global step, and graph-free ``run``.

A :class:`Session` is what hooks and listeners receive. Its ``run`` evaluates fetches
without calling hooks and without advancing the global step; the monitored sessions
drive steps through :meth:`Session._run_step`.

Fetches are a callable, a name, ``None``, or a list/tuple/dict nesting them; results
keep the same structure. A callable is called with the run's feeds as keyword
arguments (only those it accepts, unless it takes ``**kwargs``). A name is resolved
after the step against ``"global_step"``, then the keys of any mapping a callable of
this run returned (the caller's first), then the top-level entries of the state.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = ["Session"]

_GLOBAL_STEP = "global_step"


@functools.lru_cache(maxsize=1024)
def _accepted_keywords(fn: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword names ``fn`` accepts, or None when it takes ``**kwargs``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def _call(fn: Callable[..., Any], feed: Mapping[str, Any] | None) -> Any:
    if not feed:
        return fn()
    try:
        accepted = _accepted_keywords(fn)
    except TypeError:  # unhashable callable: pass every feed
        accepted = None
    if accepted is None:
        return fn(**feed)
    return fn(**{k: v for k, v in feed.items() if k in accepted})


class _Computed:
    """A callable's result, held between the call and the name-resolution phase."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class Session:
    """The raw session: a training state and an integer global step.

    Args:
      state: the mapping of names to values that is trained and checkpointed. A ``dict``
        is kept as is (not copied), so entries a restore replaces are visible to the caller.
      global_step: the initial global step.
      advance_global_step: when True (the default) every monitored ``run`` is one
        training step and increases ``global_step`` by one after the fetches have been
        computed; set False when the step function advances ``session.global_step`` itself.

    Example:
        >>> sess = Session({"w": 1.0}, global_step=3)
        >>> sess.run(["global_step", "w", lambda: 2 + 2])
        [3, 1.0, 4]
    """

    def __init__(
        self,
        state: Mapping[str, Any] | None = None,
        *,
        global_step: int = 0,
        advance_global_step: bool = True,
    ) -> None:
        if state is None:
            state = {}
        if not isinstance(state, Mapping):
            raise TypeError(
                f"state must be a mapping of names to values (a dict), got {type(state).__name__}."
            )
        self._state: dict[str, Any] = state if isinstance(state, dict) else dict(state)
        self.global_step = global_step
        self.advance_global_step = bool(advance_global_step)
        self._closed = False

    @property
    def state(self) -> dict[str, Any]:
        """The training state, the mapping that checkpoints save and restore."""
        return self._state

    @property
    def global_step(self) -> int:
        """The current global step."""
        return self._global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        try:
            step = int(value)
        except (TypeError, ValueError):
            raise TypeError(f"global_step must be an integer, got {value!r}.") from None
        if step != value:
            raise TypeError(f"global_step must be an integer, got {value!r}.")
        self._global_step = step

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._closed

    def close(self) -> None:
        """Mark the session closed; further ``run`` calls raise ``RuntimeError``."""
        self._closed = True

    def run(
        self,
        fetches: Any,
        feed_dict: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        run_metadata: dict[str, Any] | None = None,
    ) -> Any:
        """Evaluate ``fetches`` without hooks and without advancing the global step."""
        self._check_open()
        namespace: list[Mapping[str, Any]] = []
        computed = self._call_fetches(fetches, feed_dict, namespace)
        return self._resolve(computed, namespace)

    def _run_step(
        self,
        fetches: Any,
        feed_dict: Mapping[str, Any] | None,
        options: Mapping[str, Any] | None = None,
        run_metadata: dict[str, Any] | None = None,
    ) -> Any:
        """One training step: call the callables, advance the step, resolve the names."""
        self._check_open()
        if callable(fetches):
            # The common case, one step function: nothing to resolve afterwards.
            value = _call(fetches, feed_dict)
            if self.advance_global_step:
                self._global_step += 1
            return value
        namespace: list[Mapping[str, Any]] = []
        computed = self._call_fetches(fetches, feed_dict, namespace)
        if self.advance_global_step:
            self._global_step += 1
        return self._resolve(computed, namespace)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Attempted to use a closed Session.")

    def _call_fetches(
        self, fetches: Any, feed: Mapping[str, Any] | None, namespace: list[Mapping[str, Any]]
    ) -> Any:
        if fetches is None or isinstance(fetches, str):
            return fetches
        if callable(fetches):
            value = _call(fetches, feed)
            if value is not None and isinstance(value, Mapping):
                namespace.append(value)
            return _Computed(value)
        if isinstance(fetches, dict):
            return {k: self._call_fetches(v, feed, namespace) for k, v in fetches.items()}
        if isinstance(fetches, (list, tuple)):
            items = [self._call_fetches(v, feed, namespace) for v in fetches]
            if isinstance(fetches, list):
                return items
            if hasattr(fetches, "_fields"):  # namedtuple
                return type(fetches)(*items)
            return tuple(items)
        raise TypeError(
            f"Fetch argument {fetches!r} has invalid type {type(fetches).__name__}: pass a "
            "callable, a name (str), None, or a list/tuple/dict nesting them."
        )

    def _resolve(self, computed: Any, namespace: list[Mapping[str, Any]]) -> Any:
        if isinstance(computed, _Computed):
            return computed.value
        if computed is None:
            return None
        if isinstance(computed, str):
            return self._lookup(computed, namespace)
        if isinstance(computed, dict):
            return {k: self._resolve(v, namespace) for k, v in computed.items()}
        items = [self._resolve(v, namespace) for v in computed]
        if isinstance(computed, list):
            return items
        if hasattr(computed, "_fields"):
            return type(computed)(*items)
        return tuple(items)

    def _lookup(self, name: str, namespace: Iterable[Mapping[str, Any]]) -> Any:
        if name == _GLOBAL_STEP:
            return self._global_step
        for mapping in namespace:
            if name in mapping:
                return mapping[name]
        if name in self._state:
            return self._state[name]
        available = sorted({_GLOBAL_STEP, *(k for m in namespace for k in m), *self._state})
        raise ValueError(
            f"Fetch name {name!r} is not known in this run. Names available: {available}. "
            "A name resolves against 'global_step', the keys of a mapping returned by the "
            "run's callables, then the top-level state."
        )
