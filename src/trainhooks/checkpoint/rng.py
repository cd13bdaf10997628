"""Random number generator states, so a resumed run draws the numbers an uninterrupted one would.

Covers Python's ``random``, NumPy's global RNG (``np.random.*``), NumPy ``Generator``s you
name, and PyTorch's CPU and CUDA generators. Put an :class:`RNGState` in the training state
and every checkpoint saves them and every restore sets them:

    state = {"model": model, "optimizer": opt, "rng": th.RNGState({"data": data_rng})}

The captured state is a plain dict of Python values, NumPy arrays and torch tensors, so
it is stored like any other state dict (no pickle).
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["RNGState", "capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)

Generators = Mapping[str, "np.random.Generator | np.random.RandomState | np.random.BitGenerator"]


def _bit_generator(gen: Any, name: str) -> Any:
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator
    if isinstance(gen, (np.random.BitGenerator, np.random.RandomState)):
        return gen
    raise TypeError(
        f"generators[{name!r}] is a {type(gen).__qualname__}: pass a numpy.random.Generator, "
        "BitGenerator or RandomState."
    )


def _get_state(gen: Any) -> Any:
    return gen.get_state(legacy=False) if isinstance(gen, np.random.RandomState) else gen.state


def capture_rng_state(generators: Generators | None = None) -> dict[str, Any]:
    """The current states of the random number generators, as a state dict.

    Args:
      generators: NumPy generators to include besides the global ones, by name.

    Returns:
      ``{"python": ..., "numpy": ..., "generators": {...}}`` plus ``"torch"`` (and ``"cuda"``
      when CUDA is available) if torch has been imported.

    Example:
        >>> import random
        >>> saved = capture_rng_state()
        >>> a = random.random()
        >>> restore_rng_state(saved)
        >>> random.random() == a
        True
    """
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "internal": np.array(internal, dtype=np.uint32),
            "gauss_next": gauss_next,
        },
        "numpy": np.random.get_state(legacy=False),
        "generators": {
            name: _get_state(_bit_generator(gen, name)) for name, gen in (generators or {}).items()
        },
    }
    torch = sys.modules.get("torch")  # not imported: the program does not use its RNGs
    if torch is not None:
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Generators | None = None) -> None:
    """Set the random number generators to a state :func:`capture_rng_state` returned.

    Every generator in ``state`` must be among ``generators`` and vice versa; that is
    checked before any generator is changed. CUDA states are skipped, with a warning,
    when CUDA is not available or has a different number of devices.

    Args:
      state: a captured state (possibly restored from a checkpoint).
      generators: the same NumPy generators, by name, that were captured.

    Raises:
      ValueError: the named generators do not match the captured ones.
    """
    generators = dict(generators or {})
    saved = dict(state.get("generators") or {})
    if set(saved) != set(generators):
        raise ValueError(
            f"The saved RNG state has NumPy generators {sorted(saved)}, but generators= "
            f"names {sorted(generators)}: pass the same generators that were captured."
        )
    bit_generators = {name: _bit_generator(gen, name) for name, gen in generators.items()}
    if "python" in state:
        python = state["python"]
        internal = tuple(int(x) for x in np.asarray(python["internal"]))
        random.setstate((int(python["version"]), internal, python["gauss_next"]))
    if "numpy" in state:
        np.random.set_state(_numpy_state(state["numpy"]))
    for name, gen in bit_generators.items():
        if isinstance(gen, np.random.RandomState):
            gen.set_state(_numpy_state(saved[name]))
        else:
            gen.state = _numpy_state(saved[name])
    if "torch" in state or "cuda" in state:
        _restore_torch(state)


def _numpy_state(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A bit generator state with arrays NumPy accepts (owned, writable copies)."""
    out: dict[str, Any] = {}
    for key, value in saved.items():
        if isinstance(value, Mapping):
            out[key] = _numpy_state(value)
        elif isinstance(value, np.ndarray):
            out[key] = np.array(value)
        else:
            out[key] = value
    return out


def _restore_torch(state: Mapping[str, Any]) -> None:
    import torch

    if "torch" in state:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    cuda = state.get("cuda")
    if not cuda:
        return
    if not torch.cuda.is_available() or torch.cuda.device_count() != len(cuda):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        logger.warning(
            "Not restoring CUDA RNG states: saved for %d devices, %d available.",
            len(cuda),
            available,
        )
        return
    torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda])


class RNGState:
    """A training-state entry that saves and restores random number generator states.

    Its ``state_dict()`` is :func:`capture_rng_state` and its ``load_state_dict()`` is
    :func:`restore_rng_state`, so a checkpoint made with it in the state resumes the same
    random sequences: data shuffling, dropout, augmentation.

    Args:
      generators: NumPy generators to include besides the global RNGs, by name.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> holder = RNGState({"data": rng})
        >>> saved = holder.state_dict()
        >>> a = rng.random()
        >>> holder.load_state_dict(saved)
        >>> rng.random() == a
        True
    """

    def __init__(self, generators: Generators | None = None) -> None:
        self.generators = dict(generators or {})
        for name, gen in self.generators.items():
            _bit_generator(gen, name)  # fail now, not at the first save

    def state_dict(self) -> dict[str, Any]:
        """The generators' current states (see :func:`capture_rng_state`)."""
        return capture_rng_state(self.generators)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Set the generators to ``state_dict`` (see :func:`restore_rng_state`)."""
        restore_rng_state(state_dict, self.generators)
