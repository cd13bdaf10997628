"""trainhooks: TensorFlow 1.x's monitored training sessions, hooks and Saver for
PyTorch, NumPy and JAX loops, with crash-safe, verified, optionally background checkpoints.

    import trainhooks as th

    state = {"model": model, "optimizer": optimizer}
    with th.MonitoredTrainingSession(
        state=state, checkpoint_dir="ckpt", save_checkpoint_steps=100,
        hooks=[th.StopAtStepHook(last_step=1000)],
    ) as sess:
        while not sess.should_stop():
            sess.run(train_step)

The public API is exactly the names in ``__init__.pyi``; submodules are implementation.
Names are imported lazily, so ``import trainhooks`` stays cheap and never imports torch.
"""

from __future__ import annotations

from typing import Any

import lazy_loader

__version__ = "0.1.0"
"""The version of trainhooks, as in ``pyproject.toml``."""

_lazy_getattr, __dir__, _names = lazy_loader.attach_stub(__name__, __file__)
__all__ = ["__version__", *_names]


def __getattr__(name: str) -> Any:
    try:
        return _lazy_getattr(name)
    except AttributeError:
        raise AttributeError(f"module 'trainhooks' has no attribute {name!r}") from None
