"""A module's and an optimizer's tensors are restored in place when loading would only copy.

The tensors keep their storage (``data_ptr``) and get the saved values; anything that
makes ``load_state_dict`` more than a copy (a load hook, an optimizer that has not
stepped yet, another dtype) goes through ``load_state_dict`` as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import trainhooks as th

torch = pytest.importorskip("torch")


def model_and_adam(seed: int = 0) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2)
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(model: Any, optimizer: Any, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 2, generator=g)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def pointers(model: Any, optimizer: Any) -> list[int]:
    ptrs = [t.data_ptr() for t in model.state_dict().values()]
    for state in optimizer.state.values():
        ptrs += [v.data_ptr() for v in state.values() if torch.is_tensor(v)]
    return ptrs


def snapshot(model: Any, optimizer: Any) -> list[Any]:
    values = [t.clone() for t in model.state_dict().values()]
    for state in optimizer.state.values():
        values += [v.clone() if torch.is_tensor(v) else v for v in state.values()]
    return values


def same(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b)
    )


def test_a_trained_model_and_adam_restore_into_their_own_tensors(tmp_path: Path) -> None:
    model, optimizer = model_and_adam()
    train(model, optimizer, 3)
    sess = th.Session({"model": model, "optimizer": optimizer})
    saver = th.Saver()
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=3)
    saved = snapshot(model, optimizer)
    before = pointers(model, optimizer)
    train(model, optimizer, 2, start=3)
    optimizer.param_groups[0]["lr"] = 0.5
    assert not same(snapshot(model, optimizer), saved)

    saver.restore(sess, prefix)

    assert same(snapshot(model, optimizer), saved)
    assert pointers(model, optimizer) == before  # filled, not replaced
    assert optimizer.param_groups[0]["lr"] == 1e-2


def test_training_after_an_in_place_restore_matches_a_run_that_went_through(
    tmp_path: Path,
) -> None:
    through_model, through_opt = model_and_adam()
    train(through_model, through_opt, 5)

    model, optimizer = model_and_adam()
    train(model, optimizer, 3)
    sess = th.Session({"model": model, "optimizer": optimizer})
    saver = th.Saver()
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=3)
    train(model, optimizer, 4, start=3)  # drift away, then come back
    saver.restore(sess, prefix)
    train(model, optimizer, 2, start=3)

    assert same(snapshot(model, optimizer), snapshot(through_model, through_opt))


def test_a_fresh_optimizer_and_a_hooked_module_load_through_load_state_dict(
    tmp_path: Path,
) -> None:
    model, optimizer = model_and_adam()
    train(model, optimizer, 3)
    prefix = th.Saver().save(
        th.Session({"model": model, "optimizer": optimizer}), str(tmp_path / "m"), global_step=3
    )
    saved = snapshot(model, optimizer)

    fresh_model, fresh_opt = model_and_adam(seed=1)
    calls: list[str] = []
    fresh_model._register_load_state_dict_pre_hook(lambda *args: calls.append("pre-hook"))
    assert not fresh_opt.state  # nothing to fill: load_state_dict creates the state
    th.Saver().restore(th.Session({"model": fresh_model, "optimizer": fresh_opt}), prefix)

    assert calls == ["pre-hook"]  # load_state_dict ran, with the hook on the top module
    assert same(snapshot(fresh_model, fresh_opt), saved)


def test_a_module_of_another_dtype_is_converted_by_load_state_dict(tmp_path: Path) -> None:
    model = model_and_adam()[0]
    prefix = th.Saver().save(th.Session({"model": model}), str(tmp_path / "m"), global_step=0)
    expected = [t.clone().double() for t in model.state_dict().values()]
    double = model_and_adam(seed=2)[0].double()
    th.Saver().restore(th.Session({"model": double}), prefix)
    assert all(torch.equal(a, b) for a, b in zip(double.state_dict().values(), expected))


def test_a_hyperparameter_the_checkpoint_lacks_is_dropped_as_load_state_dict_drops_it(
    tmp_path: Path,
) -> None:
    model, optimizer = model_and_adam()
    train(model, optimizer, 2)
    sess = th.Session({"model": model, "optimizer": optimizer})
    saver = th.Saver()
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=2)
    reference = torch.optim.Adam(model.parameters(), lr=1e-2)
    reference.load_state_dict(optimizer.state_dict())

    optimizer.param_groups[0]["initial_lr"] = 0.123  # as a scheduler built later adds it
    saver.restore(sess, prefix)

    assert "initial_lr" not in optimizer.param_groups[0]
    assert optimizer.param_groups[0].keys() == reference.param_groups[0].keys()
