"""Resuming training from a checkpoint gives bit-for-bit the losses of an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainhooks.checkpoint.management.state_file import latest_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.session.session import Session

torch = pytest.importorskip("torch")

TOTAL_STEPS = 8
SAVE_AT = 3


def _batches() -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g))
        for _ in range(TOTAL_STEPS)
    ]


def _build(seed: int) -> dict[str, Any]:
    """A fresh model, Adam and LR schedule, initialised from ``seed``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0}


def _train(sess: Session, batches: list[tuple[Any, Any]], steps: int) -> list[float]:
    state = sess.state
    losses = []
    for _ in range(steps):
        x, y = batches[sess.global_step]
        state["optimizer"].zero_grad()
        loss = torch.nn.functional.mse_loss(state["model"](x), y)
        loss.backward()
        state["optimizer"].step()
        state["scheduler"].step()
        state["epoch"] += 1
        sess.global_step += 1
        losses.append(loss.item())
    return losses


def test_resumed_training_matches_uninterrupted_bit_for_bit(tmp_path: Path) -> None:
    batches = _batches()
    uninterrupted = Session(_build(seed=0))
    expected = _train(uninterrupted, batches, TOTAL_STEPS)

    first = Session(_build(seed=0))
    losses = _train(first, batches, SAVE_AT)
    Saver().save(first, str(tmp_path / "model.ckpt"), global_step=first.global_step)
    del first

    # Everything rebuilt from scratch, from a different initialisation.
    resumed = Session(_build(seed=99))
    prefix = latest_checkpoint(str(tmp_path))
    assert prefix == str(tmp_path / f"model.ckpt-{SAVE_AT}")
    Saver().restore(resumed, prefix)
    assert resumed.global_step == SAVE_AT
    assert resumed.state["epoch"] == SAVE_AT
    losses += _train(resumed, batches, TOTAL_STEPS - SAVE_AT)

    assert losses == expected  # exact float equality: bit for bit
    for name, tensor in uninterrupted.state["model"].state_dict().items():
        assert torch.equal(tensor, resumed.state["model"].state_dict()[name]), name
    assert (
        resumed.state["scheduler"].get_last_lr() == uninterrupted.state["scheduler"].get_last_lr()
    )
    assert resumed.state["optimizer"].state_dict()["state"][0]["step"] == TOTAL_STEPS
