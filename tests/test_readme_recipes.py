"""The README's "Common tasks" examples run as written (paths pointed at a temp dir, fewer steps)."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def block_under(heading: str) -> str:
    """The first ``python`` block after ``### heading`` in the README."""
    text = README.read_text()
    section = text.split(f"### {heading}\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match is not None, heading
    return match.group(1)


def setup_code() -> str:
    """The first example up to its session: the model, the optimizer and ``train_step``."""
    first = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    return first.split("with th.MonitoredTrainingSession(")[0]


def run(code: str, tmp_path: Path, namespace: dict[str, object]) -> None:
    for run_dir in ("/tmp/run2", "/tmp/run3"):
        code = code.replace(f'"{run_dir}"', repr(str(tmp_path / Path(run_dir).name)))
    code = code.replace("last_step=1000", "last_step=30").replace(
        "save_checkpoint_steps=100", "save_checkpoint_steps=10"
    )
    exec(compile(code, str(README), "exec"), namespace)


def test_keeping_more_checkpoints(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import trainhooks as th

    code = block_under("Keeping more checkpoints").replace("max_to_keep=20", "max_to_keep=2")
    run(setup_code() + code, tmp_path, {"__name__": "readme"})

    state = th.get_checkpoint_state(str(tmp_path / "run2"))
    assert state is not None
    assert [Path(p).name for p in state.all_model_checkpoint_paths] == [
        "model.ckpt-20",
        "model.ckpt-30",
    ]


def test_resuming_exactly_and_the_weights_without_a_session(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import trainhooks as th

    handler = signal.getsignal(signal.SIGINT)
    namespace: dict[str, object] = {"__name__": "readme"}
    run(setup_code() + block_under("Resuming exactly, and saving on Ctrl-C"), tmp_path, namespace)
    assert signal.getsignal(signal.SIGINT) == handler  # the session put Ctrl-C back
    assert th.load_variable(str(tmp_path / "run3"), "global_step") == 30
    assert "rng/torch" in dict(th.list_variables(str(tmp_path / "run3")))

    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    run(block_under("The weights without a session"), tmp_path, namespace)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[key]), key
    values = namespace["values"]
    assert isinstance(values, dict)
    assert values["optimizer/param_groups"][0]["lr"] == 0.001
