"""checkpoint/rng.py: after a restore every RNG draws the numbers it drew after the capture."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import pytest
import torch

import trainhooks as th
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.rng import RNGState, capture_rng_state, restore_rng_state
from trainhooks.checkpoint.state.tree import flatten_state, restore_state


def _draw(gens: dict[str, Any]) -> list[Any]:
    """Numbers from every generator, including the cached-Gaussian paths."""
    return [
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.randn(3).tolist(),  # leaves a cached Gaussian behind (has_gauss)
        torch.rand(3).tolist(),
        *[g.random(2).tolist() for g in gens.values()],
    ]


def _generators() -> dict[str, Any]:
    return {
        "pcg": np.random.default_rng(1),
        "mt": np.random.Generator(np.random.MT19937(2)),
        "philox": np.random.Generator(np.random.Philox(3)),
        "sfc": np.random.Generator(np.random.SFC64(4)),
    }


def test_capture_then_restore_repeats_every_generator() -> None:
    gens = _generators()
    random.gauss(0, 1)  # a cached second Gaussian in random's state
    np.random.randn()  # and in NumPy's legacy state
    saved = capture_rng_state(gens)
    first = _draw(gens)
    _draw(gens)
    restore_rng_state(saved, gens)
    assert _draw(gens) == first


def test_rng_state_in_a_checkpointed_state_resumes_the_same_numbers() -> None:
    gens = _generators()
    legacy = np.random.RandomState(7)
    holder = RNGState({**gens, "legacy": legacy})
    flat = flatten_state({"rng": holder})
    tensors = {
        n: TensorData(d.dtype, d.shape, memoryview(bytes(d.buffer)))
        for n, d in flat.tensors.items()
    }
    tree = json.loads(json.dumps(flat.tree, allow_nan=False))
    first = [*_draw(gens), legacy.rand(2).tolist()]

    # a "new process": fresh generators with other seeds, the global RNGs moved on
    fresh = {n: np.random.Generator(type(g.bit_generator)(99)) for n, g in gens.items()}
    fresh_legacy = np.random.RandomState(0)
    random.random(), np.random.rand(), torch.rand(1)
    restore_state({"rng": RNGState({**fresh, "legacy": fresh_legacy})}, tree, tensors.__getitem__)
    assert [*_draw(fresh), fresh_legacy.rand(2).tolist()] == first
    assert {"rng/torch", "rng/python/internal", "rng/numpy/state/key"} <= set(flat.tensors)


def test_generator_names_must_match_before_anything_changes() -> None:
    saved = capture_rng_state({"a": np.random.default_rng(0)})
    expected = random.getstate()
    with pytest.raises(ValueError, match=r"has generators \['a'\], but generators= names \['b'\]"):
        restore_rng_state(saved, {"b": np.random.default_rng(0)})
    assert random.getstate() == expected


def test_non_generators_are_refused_at_construction() -> None:
    with pytest.raises(
        TypeError, match=r"generators\['x'\] is a int: pass a numpy.random.Generator"
    ):
        RNGState({"x": 3})  # type: ignore[dict-item]


def test_public_names() -> None:
    assert th.RNGState is RNGState and th.capture_rng_state is capture_rng_state
    assert th.restore_rng_state is restore_rng_state


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generators_are_restored() -> None:
    saved = capture_rng_state()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    first = torch.rand(4, device="cuda").tolist()
    restore_rng_state(saved)
    assert torch.rand(4, device="cuda").tolist() == first


# --- torch.Generator: a DataLoader's shuffling ---------------------------------------------


def _epochs(loader: Any, count: int) -> list[list[list[int]]]:
    return [[batch.tolist() for batch in loader] for _ in range(count)]


def _loader(generator: torch.Generator) -> Any:
    from torch.utils.data import DataLoader

    return DataLoader(range(40), batch_size=8, shuffle=True, generator=generator)


def test_a_dataloader_resumes_its_shuffled_order_from_a_checkpoint(tmp_path: Any) -> None:
    uninterrupted = _epochs(_loader(torch.Generator().manual_seed(7)), 4)
    assert len({str(epoch) for epoch in uninterrupted}) == 4  # a new order each epoch

    # the interrupted run: two epochs, a checkpoint, then the process ends
    data_rng = np.random.default_rng(3)
    generator = torch.Generator().manual_seed(7)
    loader = _loader(generator)
    first = _epochs(loader, 2)
    state = {"rng": RNGState({"loader": generator, "data": data_rng})}
    saver = th.Saver()
    prefix = saver.save(th.Session(state, global_step=2), str(tmp_path / "model.ckpt"), 2)
    saver.close()
    numpy_next = data_rng.random(3).tolist()

    # a new process: generators seeded otherwise, the global RNGs moved on
    resumed_generator = torch.Generator().manual_seed(12345)
    resumed_data_rng = np.random.default_rng(99)
    resumed = _loader(resumed_generator)
    torch.rand(5)
    fresh = {"rng": RNGState({"loader": resumed_generator, "data": resumed_data_rng})}
    assert prefix is not None
    th.Saver().restore(th.Session(fresh), prefix)
    assert first + _epochs(resumed, 2) == uninterrupted
    assert resumed_data_rng.random(3).tolist() == numpy_next


def test_torch_generators_are_captured_and_restored_with_the_numpy_ones() -> None:
    cpu = torch.Generator().manual_seed(1)
    gens = {"torch": cpu, "numpy": np.random.default_rng(2)}
    saved = capture_rng_state(gens)
    assert isinstance(saved["generators"]["torch"], torch.Tensor)
    first = torch.rand(3, generator=cpu).tolist(), gens["numpy"].random()
    torch.rand(10, generator=cpu)
    restore_rng_state(saved, gens)
    assert (torch.rand(3, generator=cpu).tolist(), gens["numpy"].random()) == first


def test_a_numpy_and_a_torch_generator_of_one_name_do_not_restore_into_each_other() -> None:
    saved = capture_rng_state({"g": torch.Generator().manual_seed(0)})
    expected = random.getstate()
    with pytest.raises(
        ValueError, match=r"generators\['g'\] is a NumPy generator, but the saved RNG state"
    ):
        restore_rng_state(saved, {"g": np.random.default_rng(0)})
    saved = capture_rng_state({"g": np.random.default_rng(0)})
    with pytest.raises(ValueError, match=r"is a torch.Generator, but the saved RNG state holds"):
        restore_rng_state(saved, {"g": torch.Generator()})
    assert random.getstate() == expected


def test_rng_state_takes_torch_generators_and_names_them_in_its_error() -> None:
    RNGState({"loader": torch.Generator()})
    with pytest.raises(TypeError, match=r"BitGenerator or RandomState, or a torch.Generator"):
        RNGState({"x": random.Random(0)})  # type: ignore[dict-item]
