"""``trainhooks``: look at and check checkpoint directories from the shell.

    trainhooks list ckpt_dir                 # the checkpoints the state file lists, newest last
    trainhooks inspect ckpt                  # every tensor (dtype, shape) and Python value
    trainhooks verify ckpt_dir_or_ckpt ...   # check every byte range and checksum
    trainhooks consolidate ckpt out.safetensors  # every tensor, whole, in one safetensors file

``ckpt`` is a trainhooks checkpoint (a directory holding ``manifest.json``, such as
``ckpt_dir/model.ckpt-200``) or a directory of them, which means its latest checkpoint.
With ``--json`` a command prints one JSON object instead of lines. Nothing here writes or
deletes anything but the file ``consolidate`` is asked to write.

Results go to stdout. Errors, and the warnings trainhooks logs while it reads, go to
stderr as ``trainhooks <command>: ...`` lines (and into ``"warnings"`` with ``--json``).
Exit status: 0 when everything looked at is sound; 1 when a problem was found (a damaged,
missing or unreadable checkpoint, an unreadable state file, no checkpoints, a warning);
2 when the command cannot run on what it was given (a path that does not exist or is not
a checkpoint, wrong arguments).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from trainhooks import errors
from trainhooks.checkpoint.consolidate import consolidate
from trainhooks.checkpoint.format.boxes import logical_tensors
from trainhooks.checkpoint.format.opening import MANIFEST_NAME, open_checkpoint
from trainhooks.checkpoint.management.state_file import (
    DEFAULT_LATEST_FILENAME,
    find_checkpoints,
    get_checkpoint_state,
)
from trainhooks.checkpoint.reader import checkpoint_prefix
from trainhooks.checkpoint.storage import storage_for
from trainhooks.checkpoint.storage.commit import is_checkpoint
from trainhooks.checkpoint.weights import state_values

__all__ = ["main"]

_DATA_FILE = re.compile(r"data-\d+-of-\d+\.safetensors")
_TF_FILE = re.compile(r".+\.(index|meta|data-\d+-of-\d+)")


class _CannotRun(Exception):
    """The command cannot run on what it was given (exit status 2)."""


class _Problem(Exception):
    """What the command looked at has a problem (exit status 1)."""


# --- the library's log lines -------------------------------------------------------------


class _Report(logging.Handler):
    """What trainhooks logs (WARNING and up) during a command: written to stderr as
    ``trainhooks <command>: warning: ...`` and kept, for ``--json`` and the exit status."""

    def __init__(self, command: str, stream: TextIO) -> None:
        super().__init__(logging.WARNING)
        self._prefix = f"trainhooks {command}"
        self._stream = stream
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = f"{record.levelname.lower()}: {record.getMessage()}"
        except Exception:
            self.handleError(record)
            return
        self.warnings.append(line)
        print(f"{self._prefix}: {line}", file=self._stream, flush=True)


@contextmanager
def _reporting(command: str) -> Iterator[_Report]:
    """Route the ``trainhooks`` loggers into a :class:`_Report` (never stdout) for a command."""
    logger = logging.getLogger("trainhooks")
    report = _Report(command, sys.stderr)
    level, propagate = logger.level, logger.propagate
    logger.addHandler(report)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
        logger.propagate = propagate


# --- which checkpoints a path means ---------------------------------------------------------


def _not_a_checkpoint(path: str) -> str:
    """Why ``path``, which is not a directory, cannot be looked at, and what to pass instead."""
    storage = storage_for(path)
    parent, base = os.path.split(path.rstrip("/"))
    parent = parent or os.curdir
    if not storage.exists(path):
        if storage.exists(path + ".index"):
            return (
                f"{path} is a TensorFlow checkpoint, not a trainhooks one; trainhooks reads "
                f"only the checkpoints it writes (directories holding {MANIFEST_NAME})"
            )
        return f"{path} does not exist"
    if (base == MANIFEST_NAME or _DATA_FILE.fullmatch(base)) and is_checkpoint(parent):
        return f"{path} is a file of the trainhooks checkpoint {parent}: pass {parent}"
    if base == DEFAULT_LATEST_FILENAME:
        return f"{path} is the checkpoint state file of {parent}: pass the directory, {parent}"
    if _TF_FILE.fullmatch(base):
        return (
            f"{path} is a file of a TensorFlow checkpoint, not a trainhooks one; trainhooks "
            f"reads only the checkpoints it writes (directories holding {MANIFEST_NAME})"
        )
    return (
        f"{path} is a file, not a trainhooks checkpoint: pass a checkpoint (a directory "
        f"holding {MANIFEST_NAME}) or the directory holding the checkpoints"
    )


def _directory(path: str) -> str:
    """``path``, a directory of checkpoints; raises :class:`_CannotRun` otherwise."""
    storage = storage_for(path)
    if storage.is_dir(path):
        if is_checkpoint(path, storage=storage):
            parent = os.path.dirname(path.rstrip("/")) or os.curdir
            raise _CannotRun(
                f"{path} is a trainhooks checkpoint, not a directory of them: pass {parent}"
            )
        return path
    if not storage.exists(path):
        raise _CannotRun(f"No checkpoint state file in {path!r}: the directory does not exist")
    raise _CannotRun(_not_a_checkpoint(path))


def _checkpoints_in(directory: str, *, unlisted: bool) -> tuple[list[str], list[str]]:
    """The checkpoints of ``directory`` and the problems found on the way.

    The checkpoints are those its state file lists, oldest first, followed (with
    ``unlisted``) by the committed ones it does not list; without a usable state file,
    every committed checkpoint found in the directory.
    """
    problems: list[str] = []
    state_file = os.path.join(directory, DEFAULT_LATEST_FILENAME)
    listed: list[str] = []
    if storage_for(state_file).exists(state_file):
        try:
            state = get_checkpoint_state(directory)
        except ValueError as e:  # it parses but names no checkpoint
            problems.append(f"the checkpoint state file {state_file} is invalid: {e}")
        else:
            if state is None:  # the warnings logged say why
                problems.append(f"the checkpoint state file {state_file} cannot be read")
            else:
                listed = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    else:
        problems.append(f"no checkpoint state file in {directory}")
    prefixes = list(listed)
    if unlisted or not listed:
        seen = {os.path.realpath(p) for p in listed}
        found = [p for p in find_checkpoints(directory) if os.path.realpath(p) not in seen]
        if found and problems:
            problems[-1] += f"; found {len(found)} checkpoints in the directory"
        prefixes += found
    if not prefixes:
        problems.append(f"no trainhooks checkpoints in {directory}")
    return prefixes, problems


def _one_checkpoint(path: str) -> str:
    """The checkpoint ``path`` means: itself, or a directory's latest checkpoint."""
    storage = storage_for(path)
    if not storage.is_dir(path):
        raise _CannotRun(_not_a_checkpoint(path))
    if is_checkpoint(path, storage=storage):
        return path
    try:
        return checkpoint_prefix(path)  # a broken checkpoint directory comes back as it is
    except ValueError as e:
        raise _Problem(str(e)) from None


# --- the commands ----------------------------------------------------------------------------


def _size(prefix: str) -> int:
    storage = storage_for(prefix)
    if not storage.is_dir(prefix):
        return 0
    total = 0
    for name in storage.list_dir(prefix):
        path = os.path.join(prefix, name)
        if not storage.is_dir(path):
            total += storage.size(path)
    return total


def _when(wall_time: float) -> str:
    return datetime.datetime.fromtimestamp(wall_time).isoformat(timespec="seconds")


def _status_of(error: BaseException) -> str:
    return "missing" if isinstance(error, errors.NotFoundError) else "unreadable"


def _cmd_list(args: argparse.Namespace, report: _Report) -> int:
    directory = _directory(args.dir)
    prefixes, problems = _checkpoints_in(directory, unlisted=False)
    rows: list[dict[str, Any]] = []
    for prefix in prefixes:
        row: dict[str, Any] = {"prefix": prefix, "status": "ok", "global_step": None}
        row.update(wall_time=None, bytes=None, error=None)
        try:
            with open_checkpoint(prefix) as ckpt:
                row.update(global_step=ckpt.global_step, wall_time=ckpt.wall_time)
            row["bytes"] = _size(prefix)
        except (errors.Error, OSError, ValueError) as e:
            row.update(status=_status_of(e), error=str(e))
        rows.append(row)
    if args.json:
        _print_json({"directory": directory, "checkpoints": rows, "problems": problems}, report)
    else:
        for row in rows:
            if row["status"] == "ok":
                print(
                    f"{row['prefix']}\tstep={row['global_step']}\t{_when(row['wall_time'])}"
                    f"\t{row['bytes'] / 2**20:.1f} MiB"
                )
            else:
                print(f"{row['prefix']}\t{row['status'].upper()}: {row['error']}")
        _print_problems(args.command, problems)
    return 1 if problems or any(row["status"] != "ok" for row in rows) else 0


def _cmd_inspect(args: argparse.Namespace, report: _Report) -> int:
    prefix = _one_checkpoint(args.ckpt)
    problems: list[str] = []
    with open_checkpoint(prefix) as ckpt:
        # sharded tensors whole, as a reader gets them (format/boxes.py)
        logical = logical_tensors(ckpt.manifest.sharded, ckpt.manifest.tensors)
        tensors = [
            {"name": name, "dtype": dtype, "shape": list(shape)}
            for name, (dtype, shape) in sorted(logical.items())
        ]
        values: dict[str, Any] | None
        try:
            values = state_values(ckpt.tree, prefix=ckpt.prefix)
        except ValueError as e:  # a tree of another version: its tensors are still shown
            values = None
            problems.append(f"values not shown: {e}")
        header = {
            "prefix": ckpt.prefix,
            "global_step": ckpt.global_step,
            "wall_time": ckpt.wall_time,
            "metadata": ckpt.metadata,
        }
    value_rows = [
        {"name": name, "type": _type_name(value), "value": value}
        for name, value in sorted((values or {}).items())
    ]
    if args.json:
        _print_json(
            {
                **header,
                "tensors": tensors,
                "values": None if values is None else value_rows,
                "problems": problems,
            },
            report,
        )
    else:
        print(f"{header['prefix']} (global_step={header['global_step']})")
        lines = [(t["name"], f"  {t['name']}\t{t['dtype']}\t{t['shape']}") for t in tensors]
        lines += [(r["name"], f"  {r['name']}\t{r['type']}\t{r['value']!r}") for r in value_rows]
        for _, line in sorted(lines):
            print(line)
        if header["metadata"]:
            print(f"metadata: {json.dumps(_json_value(header['metadata']), sort_keys=True)}")
        _print_problems(args.command, problems)
    return 1 if problems else 0


def _cmd_verify(args: argparse.Namespace, report: _Report) -> int:
    for path in args.paths:  # every path first: a wrong one stops the command before any work
        if not storage_for(path).is_dir(path):
            raise _CannotRun(_not_a_checkpoint(path))
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for path in args.paths:
        storage = storage_for(path)
        entries = storage.list_dir(path)
        if is_checkpoint(path, storage=storage) or MANIFEST_NAME in entries:
            prefixes = [path]
        elif any(_DATA_FILE.fullmatch(e) for e in entries):
            prefixes = [path]  # a checkpoint that lost its manifest: open_checkpoint says so
        else:
            prefixes, found = _checkpoints_in(path, unlisted=True)
            problems += found
        for prefix in prefixes:
            try:
                with open_checkpoint(prefix) as ckpt:
                    ckpt.verify()
                rows.append({"prefix": prefix, "status": "ok", "error": None})
            except (errors.Error, OSError, ValueError) as e:
                status = "missing" if isinstance(e, errors.NotFoundError) else "damaged"
                rows.append({"prefix": prefix, "status": status, "error": str(e)})
    if args.json:
        _print_json({"checkpoints": rows, "problems": problems}, report)
    else:
        for row in rows:
            if row["status"] == "ok":
                print(f"OK      {row['prefix']}")
            else:
                print(f"{row['status'].upper():<8}{row['prefix']}: {row['error']}")
        _print_problems(args.command, problems)
    return 1 if problems or any(row["status"] != "ok" for row in rows) else 0


# --- output ----------------------------------------------------------------------------------


def _cmd_consolidate(args: argparse.Namespace, report: _Report) -> int:
    prefix = _one_checkpoint(args.ckpt)
    names = consolidate(prefix, args.out, entry=args.entry)
    print(f"{args.out}: {len(names)} tensors from {prefix}")
    return 0


def _type_name(value: object) -> str:
    """A value's type as the state tree names it (``int``, ``float``, ``none``, ``list``, ...)."""
    return "none" if value is None else type(value).__name__


def _json_value(value: Any) -> Any:
    """``value`` as strict JSON: non-finite floats as ``"nan"``/``"inf"``/``"-inf"``, bytes as
    base64, tuples as lists, dict keys as the ``str`` that tensor names use."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): _json_value(v) for k, v in value.items()}
    return value


def _print_json(result: dict[str, Any], report: _Report) -> None:
    result = {**result, "warnings": list(report.warnings)}
    print(json.dumps(_json_value(result), indent=2, allow_nan=False))


def _print_problems(command: str, problems: list[str]) -> None:
    for problem in problems:
        print(f"trainhooks {command}: {problem}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainhooks",
        description="Look at and check trainhooks checkpoints from the shell.",
        epilog=(
            "Exit status: 0 when everything looked at is sound; 1 when a problem was found "
            "(a damaged, missing or unreadable checkpoint or state file, no checkpoints, a "
            "warning); 2 when the command cannot run on what it was given."
        ),
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="what to do (list, inspect, verify or consolidate)",
    )
    json_help = "print one JSON object instead of lines (warnings included)"
    p = sub.add_parser(
        "list",
        help="list the checkpoints a directory's state file names, newest last",
        description="List the checkpoints a directory's state file names, newest last, "
        "with their global step, time and size.",
    )
    p.add_argument("dir", help="a directory of trainhooks checkpoints (holding a state file)")
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser(
        "inspect",
        help="show a checkpoint's tensors (dtype, shape) and Python values",
        description="Show a checkpoint's global step, every tensor with its stored dtype and "
        "shape, and every Python value of its state (epochs, counters, settings), by name.",
    )
    p.add_argument(
        "ckpt",
        help="a trainhooks checkpoint (e.g. ckpt_dir/model.ckpt-200), or a directory of "
        "them for its latest checkpoint",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help=f"{json_help}; values are strict JSON: non-finite floats as strings, bytes as base64",
    )
    p.set_defaults(fn=_cmd_inspect)
    p = sub.add_parser(
        "verify",
        help="check every byte range and checksum; exit status 1 if any checkpoint is damaged",
        description="Check every byte range and checksum of checkpoints. A directory of "
        "checkpoints means every checkpoint in it: those its state file lists, then the others.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="path",
        help="a trainhooks checkpoint, or a directory of them (all of them are verified)",
    )
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(fn=_cmd_verify)
    p = sub.add_parser(
        "consolidate",
        help="write a checkpoint's tensors, whole, into one standard safetensors file",
        description="Write every tensor of a checkpoint (sharded ones put together from "
        "their boxes) into one standard safetensors file, one tensor at a time.",
    )
    p.add_argument("ckpt", help="a trainhooks checkpoint, or a directory of them for its latest")
    p.add_argument("out", help="the .safetensors file to write")
    p.add_argument(
        "--entry",
        default=None,
        help="only this state entry's tensors, named without its prefix (e.g. model)",
    )
    p.set_defaults(fn=_cmd_consolidate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trainhooks`` command; returns the exit status.

    Example:
        >>> main(["list", "/nonexistent/run"])  # doctest: +SKIP
        2
    """
    args = _parser().parse_args(argv)
    with _reporting(args.command) as report:
        try:
            status = int(args.fn(args, report))
        except _CannotRun as e:
            print(f"trainhooks {args.command}: {e}", file=sys.stderr)
            return 2
        except _Problem as e:
            print(f"trainhooks {args.command}: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"trainhooks {args.command}: {e}", file=sys.stderr)
            return 2
        except (errors.Error, ValueError) as e:
            print(f"trainhooks {args.command}: {e}", file=sys.stderr)
            return 1
    return max(status, 1 if report.warnings else 0)


if __name__ == "__main__":
    sys.exit(main())
