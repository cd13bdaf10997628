"""The commit protocol: a prefix names a complete checkpoint at every instant, crashes included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from tests.helpers.checkpoints import Flat, leftovers
from tests.helpers.paths import ROOT, SRC
from tests.helpers.storage_doubles import FullDisk, NoExchangeStorage, ObservedStorage

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.format.tensor import TensorData
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.storage import LocalStorage, Storage
from trainhooks.checkpoint.storage.commit import delete_checkpoint, is_checkpoint, remove_leftovers
from trainhooks.errors import DataLossError


def state_for(step: int, n: int = 6, size: int = 3000) -> Flat:
    """A state whose every element equals ``step``, so a reader can tell which save it sees."""
    arrays = {f"w{i}": np.full(size + i, step, dtype=np.float32) for i in range(n)}
    tensors = {
        k: TensorData("F32", a.shape, memoryview(a.view(np.uint8))) for k, a in arrays.items()
    }
    return Flat(tensors, {"step": step})


def saved_step(prefix: Path) -> int | None:
    """The step of the complete, verified checkpoint at ``prefix``; None if there is none."""
    if not prefix.exists():
        return None
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()
        for name in ckpt.names:
            if name != "global_step":
                values = np.frombuffer(ckpt.tensor_data(name).buffer, dtype=np.float32)
                assert set(values.tolist()) == {float(ckpt.global_step)}
        assert ckpt.tree == {"step": ckpt.global_step}
        return ckpt.global_step


@pytest.mark.parametrize("storage_class", [LocalStorage, NoExchangeStorage])
def test_every_step_of_a_save_leaves_only_complete_checkpoints(
    tmp_path: Path, storage_class: type[LocalStorage]
) -> None:
    prefix = tmp_path / "model.ckpt-1"
    seen: list[tuple[str, int | None]] = []
    exchanges = storage_class is LocalStorage

    def check(op: str) -> None:
        for name in leftovers(tmp_path):
            assert not is_checkpoint(tmp_path / name)
        step = saved_step(prefix)
        # With an atomic swap the prefix is never missing once it exists.
        if exchanges and seen and seen[-1][1] is not None:
            assert step is not None, f"prefix missing before {op}"
        seen.append((op, step))

    class Observed(ObservedStorage, storage_class):  # type: ignore[misc, valid-type]
        pass

    storage = Observed(check)
    write_checkpoint(prefix, state_for(1), global_step=1, storage=storage, max_shard_bytes=30_000)
    ops = [op for op, _ in seen]
    published = ops.index("rename") + 1
    assert {step for _, step in seen[:published]} == {None}  # invisible until the rename
    assert {step for _, step in seen[published:]} == {1}
    assert saved_step(prefix) == 1
    seen.clear()
    write_checkpoint(prefix, state_for(2), global_step=2, storage=storage, max_shard_bytes=30_000)
    steps = [step for _, step in seen]
    assert steps[0] == 1 and all(s in (1, 2, None) for s in steps)
    if exchanges:
        assert None not in steps and "exchange" in [op for op, _ in seen]
    assert saved_step(prefix) == 2
    assert leftovers(tmp_path) == []


def test_readers_never_see_a_missing_or_partial_checkpoint_during_resaves(tmp_path: Path) -> None:
    prefix = tmp_path / "model.ckpt-10"
    write_checkpoint(prefix, state_for(0), global_step=0)
    stop = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                step = saved_step(prefix)
                assert step is not None
                seen.append(step)
            except BaseException as e:  # reported on the main thread
                errors.append(e)
                return

    reader = threading.Thread(target=hammer)
    reader.start()
    try:
        for step in range(1, 41):
            write_checkpoint(prefix, state_for(step), global_step=step, max_shard_bytes=40_000)
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert len(seen) > 10 and seen == sorted(seen)
    assert saved_step(prefix) == 40 and leftovers(tmp_path) == []


CRASH_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    from trainhooks.checkpoint.saving.write import write_checkpoint
    from trainhooks.checkpoint.format.tensor import TensorData
    from tests.helpers.checkpoints import Flat
    from tests.helpers.storage_doubles import CrashingStorage

    exchange, jobs = sys.argv[1] == "yes", json.loads(sys.argv[2])

    def save(directory, crash_at):
        a = np.full(5000, 2, dtype=np.float32)
        b = np.full(3000, 2, dtype=np.float32)
        tensors = {k: TensorData("F32", v.shape, memoryview(v.view(np.uint8))) for k, v in (("a", a), ("b", b))}
        write_checkpoint(os.path.join(directory, "model.ckpt-1"), Flat(tensors, {"step": 2}),
                         global_step=2, storage=CrashingStorage(crash_at, exchange=exchange),
                         max_shard_bytes=16000)

    results = []
    for directory, crash_at in jobs:
        pid = os.fork()  # one import, many crashes: each child dies at its own step
        if pid == 0:
            save(directory, crash_at)
            os._exit(0 if crash_at < 0 else 1)
        results.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print(json.dumps(results))
    """
)


def run_crashes(jobs: list[tuple[Path, int]], exchange: bool) -> list[int]:
    """Save (step 2) into each directory, crashing at the given operation; the exit codes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), str(ROOT)]))
    args = ["yes" if exchange else "no", json.dumps([(str(d), n) for d, n in jobs])]
    out = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, *args], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


@pytest.mark.slow  # a crash loop: 48 forked saves, each killed at a step
@pytest.mark.skipif(not hasattr(os, "fork"), reason="crashes are simulated in forked children")
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "fallback"])
def test_a_crash_at_any_step_leaves_a_complete_checkpoint_after_cleanup(
    tmp_path: Path, exchange: bool
) -> None:
    jobs: list[tuple[Path, int]] = []
    for crash_at in range(24):  # a few more steps than a save of two files has
        for resave in (False, True):
            directory = tmp_path / f"{crash_at}-{resave}"
            directory.mkdir()
            if resave:
                write_checkpoint(directory / "model.ckpt-1", state_for(1, n=2), global_step=1)
            jobs.append((directory, crash_at))
    codes = run_crashes(jobs, exchange)
    crashed = {d for (d, _), code in zip(jobs, codes) if code == 3}
    assert 2 * 12 < len(crashed) < len(jobs)  # every step was hit, and saves finished too
    for directory, _ in jobs:
        resave = directory.name.endswith("True")
        prefix = directory / "model.ckpt-1"
        for name in leftovers(directory):
            assert not is_checkpoint(directory / name)
        before = saved_step(prefix)
        remove_leftovers(directory)
        after = saved_step(prefix)
        assert leftovers(directory) == []
        if directory not in crashed:
            assert before == after == 2
        elif resave:
            # the old checkpoint or the new one, complete, even after a crash mid-swap
            assert after in (1, 2), directory.name
            if exchange:
                assert before == after
        else:
            assert before == after and after in (None, 2)


def test_a_failed_save_removes_its_files_and_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    prefix = tmp_path / "model.ckpt-1"
    write_checkpoint(prefix, state_for(1), global_step=1)
    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(
            prefix, state_for(2), global_step=2, storage=FullDisk(), max_shard_bytes=30_000
        )
    assert saved_step(prefix) == 1
    assert sorted(os.listdir(tmp_path)) == ["model.ckpt-1"]


def test_remove_leftovers_removes_only_leftovers_and_restores_an_interrupted_swap(
    tmp_path: Path,
) -> None:
    write_checkpoint(tmp_path / "m-1", state_for(1), global_step=1)
    write_checkpoint(tmp_path / "m-2.old-0123456789ab", state_for(2), global_step=2)
    (tmp_path / "m-1.tmp-aaaaaaaaaaaa").mkdir()
    (tmp_path / "m-1.tmp-aaaaaaaaaaaa" / "data-00000-of-00001.safetensors").write_bytes(b"x")
    write_checkpoint(tmp_path / "m-1.old-bbbbbbbbbbbb", state_for(0), global_step=0)
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "m-1"\n')
    (tmp_path / "notes.tmp-keep").write_text("not ours")

    removed = remove_leftovers(tmp_path)

    assert sorted(os.path.basename(p) for p in removed) == [
        "m-1.old-bbbbbbbbbbbb",
        "m-1.tmp-aaaaaaaaaaaa",
    ]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "m-1", "m-2", "notes.tmp-keep"]
    assert saved_step(tmp_path / "m-1") == 1
    assert saved_step(tmp_path / "m-2") == 2  # the swap interrupted before the new one arrived
    assert remove_leftovers(tmp_path) == []


def test_delete_checkpoint(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "m-1", state_for(1), global_step=1)
    delete_checkpoint(tmp_path / "m-1")
    assert os.listdir(tmp_path) == []
    delete_checkpoint(tmp_path / "m-1")  # already gone: fine
    user_dir = tmp_path / "results"
    user_dir.mkdir()
    (user_dir / "accuracy.txt").write_text("0.9")
    with pytest.raises(ValueError, match="not part of a checkpoint"):
        delete_checkpoint(user_dir)
    assert (user_dir / "accuracy.txt").read_text() == "0.9"


def test_delete_checkpoint_deletes_the_shard_files_of_a_sharded_checkpoint(tmp_path: Path) -> None:
    # what a save in a job of 2 with DTensors leaves beside the chief's files
    write_checkpoint(tmp_path / "m-1", state_for(1), global_step=1)
    for rank in (0, 1):
        (tmp_path / "m-1" / f"shards-{rank:05d}-of-00002.safetensors").write_bytes(b"boxes")
    delete_checkpoint(tmp_path / "m-1")
    assert os.listdir(tmp_path) == []


def test_storage_protocol_is_satisfied_by_local_storage(tmp_path: Path) -> None:
    storage: Storage = LocalStorage()
    assert isinstance(storage, Storage)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    storage.mkdir(a)
    storage.mkdir(b)
    f = storage.create(os.path.join(a, "x"))
    f.write([b"hello ", memoryview(b"world")])
    f.fsync()
    f.close()
    f.close()  # idempotent
    assert storage.exchange(a, b)  # ext4/tmpfs/xfs/btrfs on Linux
    assert storage.list_dir(b) == ["x"] and storage.list_dir(a) == []
    assert (tmp_path / "b" / "x").read_bytes() == b"hello world"
    with pytest.raises(FileExistsError):
        storage.rename(a, b)
    storage.remove_tree(b)
    assert not storage.exists(b)


def test_a_corrupt_resaved_checkpoint_is_reported_not_hidden(tmp_path: Path) -> None:
    prefix = tmp_path / "m-1"
    write_checkpoint(prefix, state_for(1), global_step=1)
    data = next(p for p in prefix.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x01
    data.write_bytes(raw)
    with pytest.raises(DataLossError, match=data.name):
        saved_step(prefix)
