"""The base of the ready-made listeners: one that reads the committed checkpoint from its hook."""

from __future__ import annotations

from trainhooks.hooks.checkpoint import CheckpointSaverHook, CheckpointSaverListener

__all__ = ["HookBoundListener"]


class HookBoundListener(CheckpointSaverListener):
    """A listener that reads the committed checkpoint's path from its hook.

    ``CheckpointSaverHook`` calls ``set_hook`` on every listener it is given; a subclass
    calls ``self._committed_checkpoint(step)`` in ``after_save`` for the prefix just
    committed, and gets an error that says how to attach it when it was never given to
    a hook.

    Example:
        >>> class PrintPath(HookBoundListener):
        ...     def after_save(self, session, global_step_value):
        ...         print(self._committed_checkpoint(global_step_value))
    """

    def _hook(self) -> CheckpointSaverHook:
        hook = getattr(self, "hook", None)
        if hook is None:
            raise RuntimeError(
                f"{type(self).__name__} is not attached to a CheckpointSaverHook: pass it as "
                "CheckpointSaverHook(checkpoint_dir, ..., listeners=[listener])."
            )
        return hook

    def _committed_checkpoint(self, step: int) -> str:
        path = self._hook().last_checkpoint_path
        if path is None:
            raise RuntimeError(
                f"{type(self).__name__}: the hook reports no checkpoint for step {step}; the "
                "Saver returned no path (a Saver with nothing to save?)."
            )
        return str(path)
