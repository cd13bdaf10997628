"""Random number generator states, so a resumed run draws the numbers an uninterrupted one would.

Covers Python's ``random``, NumPy's global RNG (``np.random.*``), PyTorch's global CPU and
CUDA generators, and the NumPy ``Generator``s and ``torch.Generator``s you name (a
``DataLoader(generator=g)``'s shuffling, a data pipeline's own generator). Put an
:class:`RNGState` in the training state and every checkpoint saves them and every
restore sets them:

    state = {"model": model, "optimizer": opt, "rng": th.RNGState({"data": data_rng})}

    loader_gen = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, shuffle=True, generator=loader_gen)
    state["rng"] = th.RNGState({"data": data_rng, "loader": loader_gen})

A generator itself is not a state value (a checkpoint would not know how to restore
it); the training state refuses one with a hint to wrap it here.

The captured state is a plain dict of Python values, NumPy arrays and torch tensors, so
it is stored like any other state dict (no pickle).
"""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["RNGState", "capture_rng_state", "restore_rng_state"]

logger = logging.getLogger(__name__)

Generators = Mapping[
    str,
    "np.random.Generator | np.random.RandomState | np.random.BitGenerator | torch.Generator",
]


def _is_torch_generator(gen: object) -> bool:
    torch = sys.modules.get("torch")  # not imported: cannot be a torch.Generator
    return torch is not None and isinstance(gen, torch.Generator)


def _bit_generator(gen: Any, name: str) -> Any:
    """What holds ``gen``'s state: its bit generator, or itself (RandomState, torch)."""
    if isinstance(gen, np.random.Generator):
        return gen.bit_generator
    if isinstance(gen, (np.random.BitGenerator, np.random.RandomState)):
        return gen
    if _is_torch_generator(gen):
        return gen
    raise TypeError(
        f"generators[{name!r}] is a {type(gen).__qualname__}: pass a numpy.random.Generator, "
        "BitGenerator or RandomState, or a torch.Generator."
    )


def _get_state(gen: Any) -> Any:
    if isinstance(gen, np.random.RandomState):
        return gen.get_state(legacy=False)
    if isinstance(gen, np.random.BitGenerator):
        return gen.state
    return gen.get_state()  # torch.Generator: a uint8 CPU tensor, a copy


def capture_rng_state(generators: Generators | None = None) -> dict[str, Any]:
    """The current states of the random number generators, as a state dict.

    Args:
      generators: NumPy generators and ``torch.Generator``s to include besides the
        global ones, by name.

    Returns:
      ``{"python": ..., "numpy": ..., "generators": {...}}`` plus ``"torch"`` (and ``"cuda"``
      when CUDA is available) if torch has been imported. A NumPy generator's entry in
      ``"generators"`` is its bit generator's state dict, a torch one's its state tensor.

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
      generators: the same NumPy and torch generators, by name, that were captured.

    Raises:
      ValueError: the named generators do not match the captured ones.
    """
    generators = dict(generators or {})
    saved = dict(state.get("generators") or {})
    if set(saved) != set(generators):
        raise ValueError(
            f"The saved RNG state has generators {sorted(saved)}, but generators= "
            f"names {sorted(generators)}: pass the same generators that were captured."
        )
    bit_generators = {name: _bit_generator(gen, name) for name, gen in generators.items()}
    for name, gen in bit_generators.items():
        torch_gen, torch_state = _is_torch_generator(gen), not isinstance(saved[name], Mapping)
        if torch_gen != torch_state:
            have = "a torch.Generator" if torch_gen else "a NumPy generator"
            got = "a torch.Generator's" if torch_state else "a NumPy generator's"
            raise ValueError(
                f"generators[{name!r}] is {have}, but the saved RNG state holds {got} "
                "state under that name: pass the same generators that were captured."
            )
    if "python" in state:
        python = state["python"]
        internal = tuple(int(x) for x in np.asarray(python["internal"]))
        random.setstate((int(python["version"]), internal, python["gauss_next"]))
    if "numpy" in state:
        np.random.set_state(_numpy_state(state["numpy"]))
    for name, gen in bit_generators.items():
        if isinstance(gen, np.random.RandomState):
            gen.set_state(_numpy_state(saved[name]))
        elif isinstance(gen, np.random.BitGenerator):
            gen.state = _numpy_state(saved[name])
        else:
            import torch

            gen.set_state(torch.as_tensor(saved[name], dtype=torch.uint8).cpu().contiguous())
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
      generators: NumPy generators (``Generator``, ``BitGenerator``, ``RandomState``) and
        ``torch.Generator``s to include besides the global RNGs, by name: for instance
        the one a ``DataLoader(generator=...)`` shuffles with, so that a resumed run
        visits the data in the order an uninterrupted one would.

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
