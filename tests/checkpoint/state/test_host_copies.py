"""The batched restore of a dict of plain NumPy arrays (host_copies.plan_run) and its fallbacks.

Saver.restore takes the batched path when a dict holds the saved keys in the saved order
with plain writable arrays; anything else falls back to the per-key walk. Both must
restore bit-exactly into the same objects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.state.tree import StateMismatchError
from trainhooks.session.session import Session


def _arrays(rng: np.random.Generator, n: int, dtype: str = "float32") -> dict[str, np.ndarray]:
    return {f"t{i:04d}": rng.standard_normal(8).astype(dtype) for i in range(n)}


def _save(tmp_path: Path, state: dict) -> str:
    prefix = Saver().save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    assert prefix is not None
    return prefix


def _zeroed(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.zeros_like(v) for k, v in state.items()}


def _assert_restored(target: dict, saved: dict, objects: dict) -> None:
    for k, v in saved.items():
        assert target[k] is objects[k], f"{k} was replaced, not restored in place"
        assert target[k].tobytes() == v.tobytes(), k


@pytest.mark.parametrize(
    "case", ["same order", "reordered keys", "mixed dtypes", "2-d and fortran"]
)
def test_batched_and_fallback_paths_restore_bit_exact_in_place(tmp_path: Path, case: str) -> None:
    rng = np.random.default_rng(0)
    saved: dict[str, np.ndarray] = _arrays(rng, 300)
    if case == "mixed dtypes":
        saved.update(_arrays(rng, 50, "float64"))
        saved["ints"] = np.arange(7, dtype=np.int16)
    if case == "2-d and fortran":
        saved["m"] = np.asfortranarray(rng.standard_normal((3, 5)))
    prefix = _save(tmp_path, saved)
    target = _zeroed(saved)
    if case == "reordered keys":
        target = dict(reversed(list(target.items())))
    if case == "2-d and fortran":
        target["m"] = np.asfortranarray(np.zeros((3, 5)))
    objects = dict(target)
    Saver().restore(Session(target), prefix)
    _assert_restored(target, saved, objects)


def test_a_shape_mismatch_in_a_batched_dict_writes_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    saved = _arrays(rng, 200)
    prefix = _save(tmp_path, saved)
    target = _zeroed(saved)
    target["t0150"] = np.zeros(9, np.float32)
    with pytest.raises(StateMismatchError, match="t0150"):
        Saver().restore(Session(target), prefix)
    assert all(not v.any() for v in target.values())
