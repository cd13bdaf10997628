"""The training state as named tensors plus a JSON tree, and back into the user's objects.

:func:`flatten_state` turns a state (``docs/format.md``) into :class:`FlatState`: every array
becomes a named :class:`~trainhooks.checkpoint.format.tensor.TensorData` (names are ``/``-joined
paths, ``"model/fc.weight"``, ``"optimizer/state/0/exp_avg"``) and ``tree`` records how
the names nest, the adapters used and every other value as JSON. :func:`restore_state`
checks a checkpoint against the state and only then writes it back in place.

The tree is compact, because a state may hold 100k arrays: an array is a JSON array
``[framework, dtype, shape]`` (``[framework, dtype, shape, device, scalar]`` when it
lives on an accelerator or is a NumPy scalar) and its tensor name is implied by where it
sits. Since tree version 3 a sixth item may hold extras: ``{"tied": name}`` for an array
that is the same memory as one saved before it (tied weights: one torch parameter
under two names, a state dict's detached view of it), whose bytes are stored once, under
that name, and restored into every name; ``{"key": impl}`` for a typed JAX key array,
stored as its ``jax.random.key_data``. A tree without extras is written as version 2.
Other nodes are JSON objects:

* ``{"dict": [keys], "values": [nodes]}`` (a non-str key as its value node);
* ``{"list": [nodes]}``, ``{"tuple": [nodes]}``;
* ``{"object": "module.Class", "state": node}``: an object's ``state_dict()``
  (``metadata`` for a torch state dict's ``_metadata``);
* Python values: ``{"type": "int", "value": 3}`` and alike (``adapters/python.py``).

Names: a dict's entry ``k`` under name ``n`` is ``n/k`` (``str(k)``), a list's item ``i``
is ``n/i``, an object's state dict keeps the object's name; top-level entries are their
key. ``dtype`` is the logical code (see ``dtypes.py``).

Matching on restore: arrays and objects must be where the state has them; dict keys must
match; a list, tuple or dict (below the top level) holding only Python values, like a
Python value, is replaced by the saved one (its length and keys may differ: counters a
run fills in), while one holding arrays or objects is matched item by item.

The two walks live in ``tree_flatten.py`` and ``tree_restore.py``; the vocabulary of
nodes and paths both use is ``tree_nodes.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from trainhooks import errors
from trainhooks.checkpoint.format.columns import TensorColumns
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.gc_pause import paused_gc
from trainhooks.checkpoint.state.host_copies import HostCopies
from trainhooks.checkpoint.state.tree_flatten import RESERVED_NAMES, Flattener, PlainDict
from trainhooks.checkpoint.state.tree_nodes import MalformedTree, Mismatch, entry_of
from trainhooks.checkpoint.state.tree_restore import Locate, Restorer

__all__ = [
    "EXTENDED_TREE_VERSION",
    "READABLE_TREE_VERSIONS",
    "RESERVED_NAMES",
    "TREE_VERSION",
    "FlatState",
    "MalformedTree",
    "Mismatch",
    "RestoreReport",
    "StateMismatchError",
    "check_state",
    "flatten_state",
    "restore_state",
    "restore_state_report",
]

logger = logging.getLogger(__name__)

#: The version of a tree written. A tree that holds what only version 3 readers know
#: (a tied array, a typed JAX key: a tensor node's sixth item) is written as
#: :data:`EXTENDED_TREE_VERSION` instead, so that older readers refuse it by its version
#: rather than misreading it.
TREE_VERSION = 2
EXTENDED_TREE_VERSION = 3
#: The tree versions :func:`restore_state` reads.
READABLE_TREE_VERSIONS = (TREE_VERSION, EXTENDED_TREE_VERSION)

#: The most skipped places a non-strict restore logs one by one.
_LOGGED_PROBLEMS = 100


class FlatState(NamedTuple):
    """A state as the format writes it: named tensors and the JSON tree that nests them.

    ``tensors`` maps names to ``TensorData``; :func:`flatten_state` returns it as
    :class:`~trainhooks.checkpoint.format.columns.TensorColumns`, which keeps plain NumPy
    arrays as they are (read when written) and builds a ``TensorData`` only when one is
    looked up. Buffers alias the state's arrays where possible (see :func:`flatten_state`).
    """

    tensors: Mapping[str, TensorData]
    tree: dict[str, Any]


class StateMismatchError(errors.Error, ValueError):
    """A checkpoint does not fit the state; ``problems`` lists every mismatch. Nothing was restored.

    Raised by a strict restore for any mismatch, and by a non-strict one (``strict=False``)
    only for objects that nothing in the checkpoint fits (``strict`` is then False).
    """

    def __init__(self, problems: list[Mismatch], *, strict: bool = True) -> None:
        lines = "\n".join(f"  {p}" for p in problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        if strict:
            message = (
                f"The checkpoint does not match the state ({count}); nothing was restored:\n"
                f"{lines}\nBuild the state as it was saved, or pass strict=False to restore "
                "what matches."
            )
        else:
            message = (
                f"The checkpoint does not match the state ({count}), even with strict=False: "
                f"nothing the checkpoint holds for these objects fits them, so nothing was "
                f"restored:\n{lines}\nstrict=False skips the entries that do not match, but "
                "an object that matches nothing is a mistake (another model, or a wrapper's "
                "keys: an EMA model, DDP's 'module.' prefix): restore into an object built as "
                "the saved one, or leave the object out of the state you restore."
            )
        super().__init__(message)
        self.problems = problems
        self.strict = strict


class RestoreReport(NamedTuple):
    """What a restore did, per top-level entry of the state (``state['model']``).

    ``restored``: entries restored in full; ``partial``: entries restored except for the
    places listed in ``skipped``; ``not_restored``: entries nothing was restored into;
    ``unused``: checkpoint entries the state has no place for; ``skipped``: every place
    not restored and why. Only a non-strict restore skips anything.
    """

    restored: list[str]
    partial: list[str]
    not_restored: list[str]
    unused: list[str]
    skipped: list[Mismatch]

    def __str__(self) -> str:
        parts = [
            f"{len(self.restored)} entries restored in full",
            f"{len(self.partial)} in part",
            f"{len(self.not_restored)} not restored",
        ]
        if self.unused:
            parts.append(f"{len(self.unused)} checkpoint entries unused")
        return ", ".join(parts)


def flatten_state(
    state: Mapping[str, Any],
    *,
    copy: bool = False,
    host_copy: Callable[[str, Any], TensorData | None] | None = None,
    memo: dict[str, PlainDict] | None = None,
) -> FlatState:
    """Split ``state`` into named tensors and a JSON tree.

    Args:
      state: the training state: a mapping of names to values (``docs/format.md``).
      copy: when False (the default), the buffers of contiguous host arrays alias their
        memory: write them out before the state changes (the next step). Pass True for a
        snapshot the training loop may run on from (background saving); arrays that
        must be copied anyway (accelerator tensors, strided views) are copied only once.
      host_copy: called with ``(tensor name, array)`` for every array; when it returns
        ``TensorData`` that is used instead of the adapter's conversion (e.g. a copy
        into a reused pinned buffer, ``SnapshotPool.copy_leaf``); None falls back to
        the adapter.
      memo: a dict this function keeps from one call to the next (a saver's): the
        previous state's dicts of plain NumPy arrays, whose names, dtype codes and tree
        nodes a dict with the same keys, dtypes and shapes reuses. It holds no array.

    Returns:
      A :class:`FlatState`; its ``tree`` is JSON-serialisable. With ``memo``, parts of it
      (the names, the tree's lists) are shared with the previous call's: do not modify.

    Raises:
      TypeError: a value has an unsupported type (the message names its path).
      ValueError: a reserved name (``"global_step"``) or two values with the same name.

    Example:
        >>> import numpy as np
        >>> flat = flatten_state({"w": np.zeros(3, np.float32), "epoch": 2})
        >>> sorted(flat.tensors), flat.tensors["w"].dtype
        (['w'], 'F32')
    """
    flattener = Flattener(collect=True, copy=copy, host_copy=host_copy, memo=memo)
    with paused_gc():
        root = flattener.root(state)
    if memo is not None:  # only what this state has: a dict it dropped is forgotten
        memo.clear()
        memo.update(flattener.memo_out)
    version = EXTENDED_TREE_VERSION if flattener.extended else TREE_VERSION
    tree = {"version": version, "frameworks": sorted(flattener.frameworks), "root": root}
    f = flattener
    return FlatState(TensorColumns(f.names, f.codes, f.shapes, f.sources), tree)


def check_state(state: Mapping[str, Any]) -> None:
    """Raise if ``state`` could not be checkpointed; copies no array data.

    Objects' ``state_dict()`` is called (cheap for torch: it returns references).

    Raises:
      TypeError: a value has an unsupported type, naming its path.
      ValueError: a reserved name or two values with the same tensor name.

    Example:
        >>> check_state({"fn": print})
        Traceback (most recent call last):
        ...
        TypeError: state['fn'] has unsupported type builtin_function_or_method: pass ...
    """
    Flattener(collect=False, copy=False, host_copy=None).root(state)


def restore_state(
    state: dict[str, Any],
    tree: Mapping[str, Any],
    get_tensor: Callable[[str], TensorData],
    strict: bool = True,
    *,
    locate: Locate | None = None,
    before_apply: Callable[[], None] | None = None,
    before_write: Callable[[HostCopies], None] | None = None,
) -> list[Mismatch]:
    """Restore a flattened state into ``state``'s objects, in place.

    Everything is checked first: with ``strict=True`` any missing, unexpected, mis-shaped
    or mis-typed entry raises :class:`StateMismatchError` listing them all before anything
    is written. Then tensors are copied in place (references stay valid), objects get
    ``load_state_dict``, and Python values and JAX arrays are replaced in their containers.

    With ``strict=False`` what matches is restored and the rest skipped, except that an
    object (a module, an optimizer, anything with ``state_dict()``) that the checkpoint
    holds but that none of its saved state fits (an EMA model's keys restored into a
    plain model) still raises :class:`StateMismatchError`, before anything is written.
    An object the checkpoint lacks altogether is skipped.

    Args:
      state: the state to restore into (the dict that was flattened, or one built alike).
      tree: ``FlatState.tree`` as saved.
      get_tensor: returns the ``TensorData`` saved under a name; raises KeyError for an
        unknown name. Buffers are only read during this call.
      strict: False restores what matches and skips the rest.
      locate: optional, ``format.MappedCheckpoint.locate``: where each tensor's checked
        bytes lie; plain NumPy arrays are then copied straight from there (much faster
        for many small arrays than a ``TensorData`` each).
      before_apply: called once everything is checked and before anything is written
        (also before a mismatch is raised); an exception it raises stops the restore.
        ``restore.py`` waits here for the checksum pass it ran alongside the checks.
      before_write: called with the planned host copies once the state was found to
        fit, right before they are written; it may take some out and do them itself
        (``HostCopies.take_large``). An exception it raises stops the restore.
        ``restore.py`` reads large tensors straight from the file here when asked to.

    Returns:
      The entries that were skipped (empty when ``strict``); they are also logged, with
      what was restored of each top-level entry (:func:`restore_state_report`).

    Raises:
      StateMismatchError: with ``strict``, the checkpoint does not fit the state;
        without, an object matches nothing the checkpoint holds for it.
      ValueError: the tree is of another version.
      MalformedTree: (a ``DataLossError``) the tree is not one ``flatten_state`` writes.

    Example:
        >>> import numpy as np
        >>> w = np.zeros(2)
        >>> flat = flatten_state({"w": np.ones(2)})
        >>> restore_state({"w": w}, flat.tree, flat.tensors.__getitem__)
        []
        >>> w
        array([1., 1.])
    """
    return restore_state_report(
        state,
        tree,
        get_tensor,
        strict,
        locate=locate,
        before_apply=before_apply,
        before_write=before_write,
    ).skipped


def restore_state_report(
    state: dict[str, Any],
    tree: Mapping[str, Any],
    get_tensor: Callable[[str], TensorData],
    strict: bool = True,
    *,
    locate: Locate | None = None,
    before_apply: Callable[[], None] | None = None,
    before_write: Callable[[HostCopies], None] | None = None,
) -> RestoreReport:
    """:func:`restore_state`, returning a :class:`RestoreReport` of what it did.

    Example:
        >>> import numpy as np
        >>> flat = flatten_state({"w": np.ones(2), "old": 1})
        >>> report = restore_state_report(
        ...     {"w": np.zeros(2), "new": 0}, flat.tree, flat.tensors.__getitem__, strict=False
        ... )
        >>> report.restored, report.not_restored, report.unused
        (['w'], ['new'], ['old'])
    """
    if tree.get("version") not in READABLE_TREE_VERSIONS or not isinstance(
        tree.get("root"), Mapping
    ):
        raise ValueError(
            f"Unsupported state tree (version {tree.get('version')!r}); this version of "
            f"trainhooks reads versions {', '.join(map(str, READABLE_TREE_VERSIONS))}."
        )
    restorer = Restorer(get_tensor, locate)
    with paused_gc():
        restorer.plan(state, tree["root"])
    if before_apply is not None:
        before_apply()
    if strict and restorer.problems:
        raise StateMismatchError(restorer.problems)
    if restorer.unmatched:
        raise StateMismatchError(restorer.unmatched, strict=False)
    if before_write is not None:
        before_write(restorer.copies)
    with paused_gc():
        restorer.apply()
    report = _report(state, restorer)
    if not strict:
        _log(report)
    return report


def _report(state: Mapping[str, Any], restorer: Restorer) -> RestoreReport:
    """Sort the skipped places by the top-level entry they lie under."""
    if not restorer.problem_paths:  # everything restored: no walk over 100k entries
        return RestoreReport(list(map(str, state)), [], [], [], restorer.problems)
    partial: dict[Any, None] = {}
    whole: dict[Any, None] = {}
    unused: dict[str, None] = {}
    everything = False
    for path in restorer.problem_paths:
        entry = entry_of(path)
        if entry is None:  # the state itself (a tree whose root does not fit)
            everything = True
        elif entry[0] not in state:
            unused[str(entry[0])] = None
        elif entry[1]:
            whole[entry[0]] = None
        else:
            partial[entry[0]] = None
    restored: list[str] = []
    part: list[str] = []
    none: list[str] = []
    for key in state:
        if everything or key in whole:
            none.append(str(key))
        elif key in partial:
            part.append(str(key))
        else:
            restored.append(str(key))
    return RestoreReport(restored, part, none, list(unused), restorer.problems)


def _log(report: RestoreReport) -> None:
    """Log a non-strict restore: what was restored, what was skipped and why."""
    for problem in report.skipped[:_LOGGED_PROBLEMS]:
        logger.warning("Not restored (strict=False): %s", problem)
    if len(report.skipped) > _LOGGED_PROBLEMS:
        logger.warning(
            "Not restored (strict=False): %d more places (RestoreReport.skipped lists all)",
            len(report.skipped) - _LOGGED_PROBLEMS,
        )
    for name in report.restored:
        logger.info("Restored (strict=False): state[%r] in full", name)
    for name in report.partial:
        logger.warning("Restored (strict=False): state[%r] in part; the rest skipped", name)
    for name in report.not_restored:
        logger.warning("Not restored (strict=False): state[%r], nothing of it", name)
    for name in report.unused:
        logger.warning("Not restored (strict=False): checkpoint entry %r, not in the state", name)
    logger.info("Restore with strict=False: %s.", report)
