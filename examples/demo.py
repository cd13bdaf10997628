#!/usr/bin/env python3
"""trainhooks demo: train, checkpoint, crash with SIGKILL, resume, and finish bit-identical.

    python3 dev.py demo                 # or: .venv/bin/python examples/demo.py
    python3 dev.py demo --workdir DIR   # keep the checkpoints in DIR

A small PyTorch MLP learns a synthetic regression task under
``MonitoredTrainingSession``. The batch of step ``s`` is generated from the seed and
``s`` alone, so a resumed run sees exactly the batches an uninterrupted one sees. A
``CheckpointSaverHook`` saves every 5 steps and its listener reports each checkpoint
on stdout. The demo runs itself three times as child processes:

1. a reference run, uninterrupted, to the last step;
2. a training run that the demo kills with SIGKILL soon after it reported a checkpoint;
3. a restart in the killed run's directory, which resumes from its last checkpoint.

It then prints both final losses and exits 0 only if they are bit-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any, NamedTuple

SEED = 0
LAST_STEP = 200
SAVE_STEPS = 5
KILL_AFTER = 50  # kill run 2 once it reports a checkpoint at or after this step
BATCH, FEATURES, HIDDEN = 256, 32, 128


# ---- the training child ---------------------------------------------------------------


def train(checkpoint_dir: str, last_step: int) -> None:
    """Train to ``last_step`` in ``checkpoint_dir``, resuming from its latest checkpoint."""
    import torch

    import trainhooks as th

    torch.set_num_threads(1)
    torch.manual_seed(SEED)  # the initial weights; a resumed run overwrites them
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, 1),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    true_w = torch.randn(FEATURES, 1, generator=torch.Generator().manual_seed(SEED))

    def batch(step: int) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(SEED * 1_000_003 + step)
        x = torch.randn(BATCH, FEATURES, generator=g)
        return x, torch.tanh(x @ true_w) + 0.1 * torch.randn(BATCH, 1, generator=g)

    class ReportStart(th.SessionRunHook):
        def after_create_session(self, session: Any, coord: Any) -> None:
            print(f"START {session.global_step}", flush=True)

    class ReportCheckpoints(th.CheckpointSaverListener):
        def after_save(self, session: Any, global_step_value: int) -> None:
            print(f"CHECKPOINT {global_step_value}", flush=True)

    def step_fn(step_context: Any) -> float:
        x, y = batch(step_context.session.global_step)

        def train_op() -> float:
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            return float(loss.item())

        loss: float = step_context.run_with_hooks(train_op)
        print(f"STEP {step_context.session.global_step} {loss!r}", flush=True)
        return loss

    saver_hook = th.CheckpointSaverHook(
        checkpoint_dir, save_steps=SAVE_STEPS, listeners=[ReportCheckpoints()]
    )
    loss = float("nan")
    with th.MonitoredTrainingSession(
        state={"model": model, "optimizer": optimizer},
        checkpoint_dir=checkpoint_dir,
        save_checkpoint_secs=None,  # our own saver_hook, with its listener, saves instead
        save_summaries_steps=None,
        log_step_count_steps=None,
        chief_only_hooks=[ReportStart(), saver_hook],
        hooks=[th.StopAtStepHook(last_step=last_step)],
    ) as sess:
        while not sess.should_stop():
            loss = sess.run_step_fn(step_fn)
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    print(f"FINAL {loss.hex()} {loss!r} {digest.hexdigest()}", flush=True)


# ---- the narrator ---------------------------------------------------------------------


class Run(NamedTuple):
    start: int | None
    checkpoints: list[int]
    last_step: int | None
    final: tuple[str, str, str] | None  # (loss as float.hex, loss, sha256 of the weights)


def parse(lines: list[str]) -> Run:
    start, checkpoints, last_step, final = None, [], None, None
    for line in lines:
        kind, _, rest = line.strip().partition(" ")
        if kind == "START":
            start = int(rest)
        elif kind == "CHECKPOINT":
            checkpoints.append(int(rest))
        elif kind == "STEP":
            last_step = int(rest.split()[0])
        elif kind == "FINAL":
            loss_hex, loss, digest = rest.split()
            final = (loss_hex, loss, digest)
    return Run(start, checkpoints, last_step, final)


def child(checkpoint_dir: str, last_step: int) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--child", checkpoint_dir, str(last_step)]


def run_to_completion(checkpoint_dir: str, last_step: int) -> Run:
    proc = subprocess.run(child(checkpoint_dir, last_step), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the training process failed (exit {proc.returncode}):\n{proc.stderr}")
    return parse(proc.stdout.splitlines())


def run_and_kill(checkpoint_dir: str, last_step: int, kill_after: int) -> tuple[Run, int]:
    """Start training; SIGKILL it right after it reports a checkpoint >= ``kill_after``."""
    proc = subprocess.Popen(child(checkpoint_dir, last_step), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        kind, _, rest = line.partition(" ")
        if kind == "CHECKPOINT" and int(rest) >= kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    lines.extend(proc.stdout.read().splitlines())  # what it printed before the kill landed
    proc.wait()
    return parse(lines), proc.returncode


def steps(values: list[int]) -> str:
    if len(values) > 6:
        return f"{', '.join(map(str, values[:3]))}, ..., {', '.join(map(str, values[-2:]))}"
    return ", ".join(map(str, values))


def narrate(workdir: str, last_step: int, kill_after: int) -> int:
    reference_dir = os.path.join(workdir, "reference")
    crash_dir = os.path.join(workdir, "crash-and-resume")
    print(
        f"trainhooks demo: an MLP ({FEATURES}-{HIDDEN}-{HIDDEN}-1, Adam) on synthetic data "
        f"(seed {SEED}),\n{last_step} steps, a checkpoint every {SAVE_STEPS} steps, in {workdir}\n"
    )

    print("1) Reference run, uninterrupted")
    reference = run_to_completion(reference_dir, last_step)
    assert reference.final is not None
    print(f"   checkpoints at steps {steps(reference.checkpoints)}")
    print(f"   final loss at step {reference.last_step}: {reference.final[1]}\n")

    print(f"2) Training run, killed with SIGKILL after it reports a checkpoint >= {kill_after}")
    killed, returncode = run_and_kill(crash_dir, last_step, kill_after)
    if returncode != -signal.SIGKILL:
        print(f"   the run was not killed (exit {returncode}): it finished first")
        return 1
    print(f"   checkpoints reported: {steps(killed.checkpoints)}")
    reached = max(killed.last_step or 0, *killed.checkpoints)
    print(f"   killed (SIGKILL) at step {reached} of {last_step}, mid-training")
    on_disk = sorted(
        int(name.rsplit("-", 1)[1])
        for name in os.listdir(crash_dir)
        if name.startswith("model.ckpt-") and name.rsplit("-", 1)[1].isdigit()
    )
    print(f"   complete checkpoints on disk: {steps(on_disk)}\n")

    print("3) Restart in the killed run's directory")
    resumed = run_to_completion(crash_dir, last_step)
    assert resumed.final is not None and resumed.start is not None
    print(f"   resumed from the checkpoint at step {resumed.start}", end="")
    print(f", trained steps {resumed.start + 1}-{resumed.last_step}")
    print(f"   final loss at step {resumed.last_step}: {resumed.final[1]}\n")

    same_loss = reference.final[0] == resumed.final[0]
    same_weights = reference.final[2] == resumed.final[2]
    print("Final losses:")
    print(f"   uninterrupted:    {reference.final[1]}  ({reference.final[0]})")
    print(f"   killed + resumed: {resumed.final[1]}  ({resumed.final[0]})")
    print(f"   bit-identical: {'yes' if same_loss else 'NO'}", end="")
    print(f"; final weights identical: {'yes' if same_weights else 'NO'}")
    return 0 if same_loss and same_weights else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        train(argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to keep the checkpoints (default: a temp dir)")
    parser.add_argument("--last-step", type=int, default=LAST_STEP)
    parser.add_argument("--kill-after", type=int, default=KILL_AFTER)
    args = parser.parse_args(argv)
    if not 0 < args.kill_after < args.last_step - SAVE_STEPS:
        parser.error("--kill-after must be between 0 and --last-step minus one checkpoint interval")
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        return narrate(args.workdir, args.last_step, args.kill_after)
    with tempfile.TemporaryDirectory(prefix="trainhooks-demo-") as workdir:
        return narrate(workdir, args.last_step, args.kill_after)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
