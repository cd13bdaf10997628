"""``trainhooks``: look at and check checkpoint directories from the shell.

    trainhooks list ckpt_dir          # the checkpoints the state file lists, newest last
    trainhooks inspect ckpt           # every variable with its shape and dtype
    trainhooks verify ckpt_dir_or_ckpt ...   # check every byte range and checksum; exit 1 on damage

``ckpt`` is a checkpoint prefix (``ckpt_dir/model.ckpt-200``) or a directory, which
means its latest checkpoint. Nothing here writes or deletes anything.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Sequence

from trainhooks import errors
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.management.state_file import get_checkpoint_state, latest_checkpoint
from trainhooks.checkpoint.reader import load_checkpoint

__all__ = ["main"]


def _listed(directory: str) -> list[str]:
    state = get_checkpoint_state(directory)
    if state is None:
        raise errors.NotFoundError(f"No checkpoint state file in {directory!r}.")
    return list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]


def _size(prefix: str) -> int:
    if not os.path.isdir(prefix):
        return 0
    return sum(e.stat().st_size for e in os.scandir(prefix) if e.is_file())


def _cmd_list(args: argparse.Namespace) -> int:
    for prefix in _listed(args.dir):
        try:
            with open_checkpoint(prefix) as ckpt:
                when = datetime.datetime.fromtimestamp(ckpt.wall_time).isoformat(timespec="seconds")
                print(f"{prefix}\tstep={ckpt.global_step}\t{when}\t{_size(prefix) / 2**20:.1f} MiB")
        except (errors.Error, OSError, ValueError) as e:
            print(f"{prefix}\tUNREADABLE: {e}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    reader = load_checkpoint(args.ckpt)
    try:
        print(f"{reader.prefix} (global_step={reader.global_step})")
        shapes = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
        for name in sorted(shapes):
            print(f"  {name}\t{dtypes[name]}\t{shapes[name]}")
    finally:
        reader.close()
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    bad = 0
    for path in args.paths:
        if os.path.isfile(os.path.join(path, "manifest.json")):
            prefixes = [path]
        elif latest_checkpoint(path) is not None or get_checkpoint_state(path) is not None:
            prefixes = _listed(path)
        else:
            prefixes = [path]
        for prefix in prefixes:
            try:
                with open_checkpoint(prefix) as ckpt:
                    ckpt.verify()
                print(f"OK      {prefix}")
            except (errors.Error, OSError, ValueError) as e:
                bad += 1
                print(f"DAMAGED {prefix}: {e}")
    return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trainhooks`` command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="trainhooks", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list the checkpoints a directory's state file names")
    p.add_argument("dir")
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser("inspect", help="show a checkpoint's variables, shapes and dtypes")
    p.add_argument("ckpt")
    p.set_defaults(fn=_cmd_inspect)
    p = sub.add_parser("verify", help="verify checkpoints; exit status 1 if any is damaged")
    p.add_argument("paths", nargs="+")
    p.set_defaults(fn=_cmd_verify)
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except (errors.Error, OSError, ValueError) as e:
        print(f"trainhooks {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
