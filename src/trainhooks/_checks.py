"""Argument checks for the public constructors and factories, run once at construction.

Every check names the argument, shows what it got and says what to pass, in one style::

    save_checkpoint_steps must be a positive int (or None), got '100' (a str): pass save_checkpoint_steps=100

A value of the wrong type raises ``TypeError``; a value of the right type that is out of
range raises ``ValueError``. ``bool`` is never accepted as a number (``True`` is an
``int`` to Python, but ``save_steps=True`` is a mistake). NumPy integers and floats are
numbers. Each check returns the value to use, so a constructor can write
``hooks = hook_list("hooks", hooks)``: lists come back as lists, paths as ``str`` with
``~`` expanded.

The checks run in constructors only, never per step. This module imports nothing from
trainhooks (the layering contract allows it :mod:`trainhooks.errors` at most), so every
layer may use it.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal, overload

__all__ = [
    "boolean",
    "directory_path",
    "function",
    "has_methods",
    "hook_list",
    "instance_of",
    "integer",
    "listener_list",
    "mapping",
    "non_negative_int",
    "non_negative_number",
    "path",
    "positive_int",
    "positive_number",
    "string",
    "summary_writer",
]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_HOOK_METHODS = ("begin", "after_create_session", "before_run", "after_run", "end")
_LISTENER_METHODS = ("begin", "before_save", "after_save", "end")
_HOOK_EXAMPLE = "[StopAtStepHook(last_step=100)]"
_LISTENER_EXAMPLE = "[BackupListener('/mnt/backup')]"


def _describe(value: Any) -> str:
    """``'100' (a str)``, ``the class StopAtStepHook``, ``the function f``: what was passed."""
    if isinstance(value, type):
        return f"the class {value.__name__}"
    if callable(value) and hasattr(value, "__code__"):
        return f"the function {value.__name__}"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    kind = type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{text} ({article} {kind})"


def _fail(error: type[Exception], name: str, what: str, value: Any, suggestion: str) -> Exception:
    return error(f"{name} must be {what}, got {_describe(value)}: pass {name}={suggestion}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _int_suggestion(value: Any, example: int, minimum: int) -> int:
    """An int close to what was meant (``'100'`` -> 100, ``100.0`` -> 100, -5 -> 5), else ``example``."""
    candidate: Any = None
    if isinstance(value, str):
        try:
            candidate = float(value.strip())
        except ValueError:
            candidate = None
    elif _is_number(value):
        candidate = value
    if candidate is not None and math.isfinite(candidate) and float(candidate).is_integer():
        candidate = int(candidate)
        if candidate < minimum:
            candidate = -candidate
        if candidate >= minimum:
            return candidate
    return example


def _number_suggestion(value: Any, example: float, *, positive: bool) -> float:
    """A number close to what was meant (``'1.5'`` -> 1.5, -5 -> 5), else ``example``."""
    candidate: Any = None
    if isinstance(value, str):
        try:
            candidate = float(value.strip())
        except ValueError:
            candidate = None
    elif _is_number(value):
        candidate = float(value)
    if candidate is not None and math.isfinite(candidate):
        candidate = abs(candidate)
        if candidate > 0 or not positive:
            return int(candidate) if candidate.is_integer() else candidate
    return example


def _or_none(what: str, allow_none: bool) -> str:
    return f"{what} (or None)" if allow_none else what


def integer(name: str, value: Any, *, allow_none: bool = True, example: int = 0) -> int | None:
    """``value`` as an int; any int, ``None`` only with ``allow_none``.

    Raises:
      TypeError: ``value`` is not an int (a ``bool``, ``float`` or ``str`` is not).

    Example:
        >>> integer("wait_until_step", -3)
        -3
        >>> integer("wait_until_step", "10", allow_none=False)
        Traceback (most recent call last):
        ...
        TypeError: wait_until_step must be an int, got '10' (a str): pass wait_until_step=10
    """
    if value is None and allow_none:
        return None
    if not _is_int(value):
        suggestion = _int_suggestion(value, example, minimum=-(2**63))
        raise _fail(TypeError, name, _or_none("an int", allow_none), value, str(suggestion))
    return int(value)


def positive_int(
    name: str, value: Any, *, allow_none: bool = True, allow_zero: bool = False, example: int = 100
) -> int | None:
    """``value`` as a positive int; ``None`` with ``allow_none``; ``0`` with ``allow_zero``.

    ``allow_zero`` keeps TensorFlow's meaning of 0 where it has one (``save_steps=0``:
    every new step; ``save_checkpoint_steps=0``: no checkpoint hook); the message still
    asks for a positive int, the value to pass to turn the thing on.

    Raises:
      TypeError: ``value`` is not an int (a ``bool``, ``float`` or ``str`` is not).
      ValueError: ``value`` is below 1 (below 0 with ``allow_zero``).

    Example:
        >>> positive_int("save_checkpoint_steps", 100)
        100
        >>> positive_int("save_checkpoint_steps", None) is None
        True
        >>> positive_int("save_checkpoint_steps", "100")
        Traceback (most recent call last):
        ...
        TypeError: save_checkpoint_steps must be a positive int (or None), got '100' (a str): pass save_checkpoint_steps=100
        >>> positive_int("save_checkpoint_steps", -5)
        Traceback (most recent call last):
        ...
        ValueError: save_checkpoint_steps must be a positive int (or None), got -5 (an int): pass save_checkpoint_steps=5
        >>> positive_int("keep", True, allow_none=False, example=3)
        Traceback (most recent call last):
        ...
        TypeError: keep must be a positive int, got True (a bool): pass keep=3
    """
    if value is None and allow_none:
        return None
    what = _or_none("a positive int", allow_none)
    if not _is_int(value):
        raise _fail(TypeError, name, what, value, str(_int_suggestion(value, example, 1)))
    if value < (0 if allow_zero else 1):
        raise _fail(ValueError, name, what, value, str(_int_suggestion(value, example, 1)))
    return int(value)


def non_negative_int(
    name: str, value: Any, *, allow_none: bool = True, example: int = 0
) -> int | None:
    """``value`` as an int ``>= 0``; ``None`` only with ``allow_none``.

    Raises:
      TypeError: ``value`` is not an int (a ``bool``, ``float`` or ``str`` is not).
      ValueError: ``value`` is negative.

    Example:
        >>> non_negative_int("last_step", 0)
        0
        >>> non_negative_int("last_step", "100", example=100)
        Traceback (most recent call last):
        ...
        TypeError: last_step must be a non-negative int (or None), got '100' (a str): pass last_step=100
    """
    if value is None and allow_none:
        return None
    what = _or_none("a non-negative int", allow_none)
    if not _is_int(value):
        raise _fail(TypeError, name, what, value, str(_int_suggestion(value, example, 0)))
    if value < 0:
        raise _fail(ValueError, name, what, value, str(_int_suggestion(value, example, 0)))
    return int(value)


def positive_number(
    name: str,
    value: Any,
    *,
    allow_none: bool = True,
    allow_zero: bool = False,
    unit: str = "",
    example: float = 600,
) -> Any:
    """``value``, an int or float ``> 0`` (``>= 0`` with ``allow_zero``), not NaN.

    ``unit`` completes the message: ``"a positive number of seconds"``. As for
    :func:`positive_int`, ``allow_zero`` keeps TensorFlow's meaning of 0 without
    advertising it. Infinity is accepted (never).

    Raises:
      TypeError: ``value`` is not a number (a ``bool`` or ``str`` is not).
      ValueError: ``value`` is NaN or too small.

    Example:
        >>> positive_number("save_checkpoint_secs", 0.5, unit="seconds")
        0.5
        >>> positive_number("save_checkpoint_secs", "600", unit="seconds")
        Traceback (most recent call last):
        ...
        TypeError: save_checkpoint_secs must be a positive number of seconds (or None), got '600' (a str): pass save_checkpoint_secs=600
    """
    if value is None and allow_none:
        return None
    what = _or_none(f"a positive number{' of ' + unit if unit else ''}", allow_none)
    suggestion = str(_number_suggestion(value, example, positive=True))
    if not _is_number(value):
        raise _fail(TypeError, name, what, value, suggestion)
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise _fail(ValueError, name, what, value, suggestion)
    return value


def non_negative_number(
    name: str, value: Any, *, allow_none: bool = True, unit: str = "", example: float = 0
) -> Any:
    """``value``, an int or float ``>= 0``, not NaN; ``None`` only with ``allow_none``.

    Raises:
      TypeError: ``value`` is not a number (a ``bool`` or ``str`` is not).
      ValueError: ``value`` is negative or NaN.

    Example:
        >>> non_negative_number("max_wait_secs", 7200, unit="seconds")
        7200
        >>> non_negative_number("keep_checkpoint_every_n_hours", -1.5, allow_none=False,
        ...                     unit="hours", example=10000.0)
        Traceback (most recent call last):
        ...
        ValueError: keep_checkpoint_every_n_hours must be a non-negative number of hours, got -1.5 (a float): pass keep_checkpoint_every_n_hours=1.5
    """
    if value is None and allow_none:
        return None
    what = _or_none(f"a non-negative number{' of ' + unit if unit else ''}", allow_none)
    suggestion = str(_number_suggestion(value, example, positive=False))
    if not _is_number(value):
        raise _fail(TypeError, name, what, value, suggestion)
    if math.isnan(value) or value < 0:
        raise _fail(ValueError, name, what, value, suggestion)
    return value


def boolean(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value``, which must be ``True`` or ``False`` (a NumPy bool too; not 0 or 1);
    ``None`` too with ``allow_none``.

    Raises:
      TypeError: ``value`` is not a bool.

    Example:
        >>> boolean("async_save", True)
        True
        >>> boolean("async_save", "yes")
        Traceback (most recent call last):
        ...
        TypeError: async_save must be True or False, got 'yes' (a str): pass async_save=True
    """
    if isinstance(value, bool) or (value is None and allow_none):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    suggestion = (
        "False"
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "0", "")
        else "True"
    )
    raise _fail(TypeError, name, "True or False", value, suggestion)


def string(
    name: str, value: Any, *, allow_none: bool = False, allow_empty: bool = True, example: str = ""
) -> str | None:
    """``value``, a ``str`` (non-empty unless ``allow_empty``); ``None`` with ``allow_none``.

    Raises:
      TypeError: ``value`` is not a str.
      ValueError: ``value`` is empty and ``allow_empty`` is False.

    Example:
        >>> string("checkpoint_basename", "", allow_empty=False, example="'model.ckpt'")
        Traceback (most recent call last):
        ...
        ValueError: checkpoint_basename must be a non-empty str, got '' (a str): pass checkpoint_basename='model.ckpt'
    """
    if value is None and allow_none:
        return None
    what = _or_none("a non-empty str" if not allow_empty else "a str", allow_none)
    if not isinstance(value, str):
        raise _fail(TypeError, name, what, value, example or repr(str(value)))
    if not value and not allow_empty:
        raise _fail(ValueError, name, what, value, example)
    return value


def function(
    name: str, value: Any, *, allow_none: bool = False, what: str = "a function", example: str
) -> Any:
    """``value``, a callable; ``None`` only with ``allow_none``.

    Raises:
      TypeError: ``value`` is not callable.

    Example:
        >>> function("feed_fn", {"batch": 1}, example="lambda: {'batch': next(batches)}")
        Traceback (most recent call last):
        ...
        TypeError: feed_fn must be a function, got {'batch': 1} (a dict): pass feed_fn=lambda: {'batch': next(batches)}
    """
    if value is None and allow_none:
        return None
    if not callable(value):
        raise _fail(TypeError, name, _or_none(what, allow_none), value, example)
    return value


def mapping(name: str, value: Any, *, allow_none: bool = True, example: str) -> Any:
    """``value``, a mapping such as a ``dict``; ``None`` only with ``allow_none``.

    Raises:
      TypeError: ``value`` is not a mapping.

    Example:
        >>> mapping("final_ops_feed_dict", [("x", 1)], example="{'x': 1}")
        Traceback (most recent call last):
        ...
        TypeError: final_ops_feed_dict must be a mapping (or None), got [('x', 1)] (a list): pass final_ops_feed_dict={'x': 1}
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        raise _fail(TypeError, name, _or_none("a mapping", allow_none), value, example)
    return value


def has_methods(name: str, value: Any, methods: Iterable[str], *, what: str, example: str) -> Any:
    """``value``, None or an object (not a class) with every method in ``methods``.

    Raises:
      TypeError: ``value`` is a class, or lacks one of the methods.

    Example:
        >>> has_methods("summary_writer", "logs", ("add_scalar", "flush"),
        ...             what="a writer with add_scalar() and flush()",
        ...             example="tensorboardX.SummaryWriter('logs')")
        Traceback (most recent call last):
        ...
        TypeError: summary_writer must be a writer with add_scalar() and flush() (or None), got 'logs' (a str): pass summary_writer=tensorboardX.SummaryWriter('logs')
    """
    if value is None:
        return None
    if isinstance(value, type) or not all(callable(getattr(value, m, None)) for m in methods):
        raise _fail(TypeError, name, f"{what} (or None)", value, example)
    return value


def instance_of(name: str, value: Any, cls: type, *, allow_none: bool = True, example: str) -> Any:
    """``value``, an instance of ``cls`` (the caller's class); ``None`` only with ``allow_none``.

    Raises:
      TypeError: ``value`` is not a ``cls`` (a class instead of an instance is not).

    Example:
        >>> class Scaffold: ...
        >>> instance_of("scaffold", Scaffold, Scaffold, example="Scaffold()")
        Traceback (most recent call last):
        ...
        TypeError: scaffold must be a Scaffold instance (or None), got the class Scaffold: pass scaffold=Scaffold()
    """
    if value is None and allow_none:
        return None
    if not isinstance(value, cls):
        what = _or_none(f"a {cls.__name__} instance", allow_none)
        raise _fail(TypeError, name, what, value, example)
    return value


def _instance_list(
    name: str, value: Any, *, kind: str, methods: tuple[str, ...], example: str
) -> list[Any]:
    """``value`` as a list of objects that have ``methods``; None is ``[]``."""
    if value is None:
        return []
    tail = f"pass a list of {kind} instances, e.g. {name}={example}"

    def is_instance(item: Any) -> bool:
        return not isinstance(item, type) and all(callable(getattr(item, m, None)) for m in methods)

    if is_instance(value):
        raise TypeError(
            f"{name} must be a list of {kind}s, got a single {type(value).__name__}: {tail}"
        )
    if isinstance(value, type) or (callable(value) and not isinstance(value, Iterable)):
        raise TypeError(
            f"{name} must be a list of {kind} instances, got {_describe(value)}: {tail}"
        )
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise TypeError(
            f"{name} must be a list of {kind} instances, got {_describe(value)}: {tail}"
        )
    items = list(value)
    for i, item in enumerate(items):
        if isinstance(item, type):
            raise TypeError(
                f"{name}[{i}] is the class {item.__name__}, not an instance (call it: "
                f"{item.__name__}(...)): {tail}"
            )
        if not is_instance(item):
            missing = [m for m in methods if not callable(getattr(item, m, None))]
            raise TypeError(
                f"{name}[{i}] is {_describe(item)}, not a {kind} (it has no "
                f"{', '.join(missing)}): {tail}"
            )
    return items


def hook_list(name: str, value: Any) -> list[Any]:
    """``value`` as a list of hook instances (``SessionRunHook`` or alike); None is ``[]``.

    A hook is any object with ``begin``, ``after_create_session``, ``before_run``,
    ``after_run`` and ``end``, as a ``SessionRunHook`` subclass has. Refused, with a
    ``TypeError`` that says to pass a list of hook instances: a single hook, a hook
    class, a function, a string or a dict, or a list holding any of these.

    Example:
        >>> class Hook:
        ...     def begin(self): ...
        ...     def after_create_session(self, session, coord): ...
        ...     def before_run(self, run_context): ...
        ...     def after_run(self, run_context, run_values): ...
        ...     def end(self, session): ...
        >>> len(hook_list("hooks", (Hook(), Hook())))
        2
        >>> hook_list("hooks", None)
        []
        >>> hook_list("hooks", Hook())
        Traceback (most recent call last):
        ...
        TypeError: hooks must be a list of hooks, got a single Hook: pass a list of hook instances, e.g. hooks=[StopAtStepHook(last_step=100)]
        >>> hook_list("chief_only_hooks", [Hook])
        Traceback (most recent call last):
        ...
        TypeError: chief_only_hooks[0] is the class Hook, not an instance (call it: Hook(...)): pass a list of hook instances, e.g. chief_only_hooks=[StopAtStepHook(last_step=100)]
    """
    return _instance_list(name, value, kind="hook", methods=_HOOK_METHODS, example=_HOOK_EXAMPLE)


def listener_list(name: str, value: Any) -> list[Any]:
    """``value`` as a list of ``CheckpointSaverListener`` instances (or alike); None is ``[]``.

    A listener is any object with ``begin``, ``before_save``, ``after_save`` and ``end``.

    Example:
        >>> listener_list("listeners", lambda session, step: None)
        Traceback (most recent call last):
        ...
        TypeError: listeners must be a list of listener instances, got the function <lambda>: pass a list of listener instances, e.g. listeners=[BackupListener('/mnt/backup')]
    """
    return _instance_list(
        name, value, kind="listener", methods=_LISTENER_METHODS, example=_LISTENER_EXAMPLE
    )


def _expanded(name: str, value: Any, allow_none: bool, what: str, example: str) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise _fail(TypeError, name, _or_none(what, allow_none), value, example)
    text = os.fspath(value)
    if not isinstance(text, str):  # a bytes path
        raise _fail(TypeError, name, _or_none(what, allow_none), value, repr(os.fsdecode(text)))
    return text if _SCHEME.match(text) else os.path.expanduser(text)


@overload
def path(name: str, value: Any, *, allow_none: Literal[False], example: str = ...) -> str: ...
@overload
def path(name: str, value: Any, *, allow_none: bool = ..., example: str = ...) -> str | None: ...
def path(
    name: str, value: Any, *, allow_none: bool = True, example: str = "'/tmp/run/model.ckpt'"
) -> str | None:
    """``value`` (a ``str`` or ``os.PathLike``) as a ``str``, with ``~`` expanded.

    Paths with a scheme (``memory://``, ``file://``) are returned unchanged.

    Raises:
      TypeError: ``value`` is not a str or path.

    Example:
        >>> import os
        >>> path("save_path", "~/run/model.ckpt") == os.path.expanduser("~/run/model.ckpt")
        True
        >>> path("save_path", "memory://run/model.ckpt")
        'memory://run/model.ckpt'
    """
    return _expanded(name, value, allow_none, "a path (str or os.PathLike)", example)


@overload
def directory_path(
    name: str, value: Any, *, allow_none: Literal[False], example: str = ...
) -> str: ...
@overload
def directory_path(
    name: str, value: Any, *, allow_none: bool = ..., example: str = ...
) -> str | None: ...
def directory_path(
    name: str, value: Any, *, allow_none: bool = True, example: str = "'/tmp/run'"
) -> str | None:
    """``value`` as a directory path ``str``, ``~`` expanded; a local one must not be a file.

    The directory need not exist (it is created when used). Paths with a scheme other
    than ``file://`` are not looked at.

    Raises:
      TypeError: ``value`` is not a str or path.
      ValueError: ``value`` names an existing regular file.

    Example:
        >>> import os, tempfile
        >>> run = tempfile.mkdtemp()
        >>> directory_path("checkpoint_dir", run) == run
        True
        >>> state_file = os.path.join(run, "checkpoint")
        >>> open(state_file, "w").close()
        >>> directory_path("checkpoint_dir", state_file)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: checkpoint_dir '.../checkpoint' is a file, not a directory: pass the directory it is in, or another one, e.g. checkpoint_dir='...'
    """
    text = _expanded(name, value, allow_none, "a directory path (str or os.PathLike)", example)
    if text is None:
        return None
    local = text[len("file://") :] if text.startswith("file://") else text
    if not _SCHEME.match(local) and os.path.isfile(local):
        parent = os.path.dirname(os.path.abspath(local))
        if text.startswith("file://"):
            parent = "file://" + parent
        raise ValueError(
            f"{name} {text!r} is a file, not a directory: pass the directory it is in, or "
            f"another one, e.g. {name}={parent!r}"
        )
    return text


def summary_writer(name: str, value: object) -> None:
    """Refuse anything but None or a writer with ``add_scalar()`` and ``flush()``.

    Example:
        >>> summary_writer("summary_writer", None)
    """
    has_methods(
        name,
        value,
        ("add_scalar", "flush"),
        what="a writer with add_scalar() and flush()",
        example="tensorboardX.SummaryWriter('logs')",
    )
