"""Checkpoint names, as TensorFlow's ``Saver.save`` makes them.

A checkpoint saved at ``save_path`` with a step is named ``<save_path>-<step>``
(``-%08d`` with ``pad_step_number``); without a step it is ``save_path`` itself, which
then must not be the state file.
"""

from __future__ import annotations

import operator
import os

from trainhooks.checkpoint.management.state_file import DEFAULT_LATEST_FILENAME

__all__ = ["checked_latest_filename", "checkpoint_name"]


def checked_latest_filename(latest_filename: str | None) -> str:
    """The state file's name: ``latest_filename``, or ``"checkpoint"`` for None.

    Raises:
      ValueError: ``latest_filename`` has a directory part.

    Example:
        >>> checked_latest_filename(None)
        'checkpoint'
    """
    if latest_filename is None:
        return DEFAULT_LATEST_FILENAME
    if os.path.split(latest_filename)[0]:
        raise ValueError("'latest_filename' must not contain path components")
    return latest_filename


def checkpoint_name(
    save_path: str, global_step: int | None, latest_filename: str, *, pad_step_number: bool
) -> str:
    """The prefix of the checkpoint saved at ``save_path`` and ``global_step``.

    Args:
      save_path: the prefix without the step, e.g. ``"ckpt/model.ckpt"``.
      global_step: the step appended to the name, or None for none.
      latest_filename: the state file's name, which a name without a step must not be.
      pad_step_number: write the step as ``%08d``.

    Raises:
      TypeError: ``global_step`` is not an integer.
      ValueError: without a step, ``save_path`` names the state file.

    Example:
        >>> checkpoint_name("ckpt/model.ckpt", 200, "checkpoint", pad_step_number=False)
        'ckpt/model.ckpt-200'
    """
    if global_step is not None:
        try:
            step = operator.index(global_step)
        except TypeError:
            raise TypeError(
                f"global_step must be an integer (e.g. session.global_step), got {global_step!r}."
            ) from None
        return f"{save_path}-{step:08d}" if pad_step_number else f"{save_path}-{step}"
    if os.path.basename(save_path) == latest_filename:
        raise ValueError(
            f"'latest_filename' collides with 'save_path': '{latest_filename}' and '{save_path}'"
        )
    return save_path
