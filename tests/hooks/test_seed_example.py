"""The example from the seed's CheckpointSaverListener page, with a PyTorch model as the state.

The seed (TF's docs) builds ``CheckpointSaverHook(checkpoint_dir, listeners=[listener])``
without ``save_secs`` or ``save_steps``; TF itself refuses that, and so does trainhooks
(first test). The rest runs the example with ``save_steps`` added.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import trainhooks as th


class ExampleCheckpointSaverListener(th.CheckpointSaverListener):
    def begin(self) -> None:
        # You can add ops to the graph here.
        print("Starting the session.")
        self.your_tensor = None

    def before_save(self, session: Any, global_step_value: int) -> None:
        print("About to write a checkpoint")

    def after_save(self, session: Any, global_step_value: int) -> None:
        print("Done writing checkpoint.")

    def end(self, session: Any, global_step_value: int) -> None:
        print("Done with the session.")


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_the_seed_call_without_a_schedule_is_refused_as_in_tf(tmp_path: Path) -> None:
    listener = ExampleCheckpointSaverListener()
    with pytest.raises(
        ValueError, match=re.escape("Either every_secs or every_steps should be provided.")
    ):
        th.CheckpointSaverHook(str(tmp_path), listeners=[listener])


def test_seed_example_with_a_pytorch_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint_dir = str(tmp_path)
    model, optimizer = make_model()
    x, y = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.ones(8, 1)

    def train_step() -> float:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    listener = ExampleCheckpointSaverListener()
    saver_hook = th.CheckpointSaverHook(checkpoint_dir, save_steps=2, listeners=[listener])
    with th.MonitoredTrainingSession(
        state={"model": model, "optimizer": optimizer}, chief_only_hooks=[saver_hook]
    ) as sess:
        for _ in range(3):
            sess.run(train_step)

    # Saves at creation (0), after steps 2 and 3 (the final save in end).
    save = ["About to write a checkpoint", "Done writing checkpoint."]
    assert capsys.readouterr().out.splitlines() == [
        "Starting the session.",
        *save,
        *save,
        *save,
        "Done with the session.",
    ]
    state = th.get_checkpoint_state(checkpoint_dir)
    assert state is not None
    assert state.all_model_checkpoint_paths == [
        str(tmp_path / f"model.ckpt-{s}") for s in (0, 2, 3)
    ]
    # The last checkpoint holds the trained model: restoring it into a fresh model
    # gives back the same weights, bit for bit.
    fresh, fresh_optimizer = make_model()
    assert not torch.equal(fresh.weight, model.weight)
    restored = th.Session({"model": fresh, "optimizer": fresh_optimizer})
    th.Saver().restore(restored, th.latest_checkpoint(checkpoint_dir))
    assert restored.global_step == 3
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
