"""Background saving (docs/internals.md): Saver(async_save=True), its snapshot pool and writer thread."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.helpers.paths import SRC

from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.management.state_file import get_checkpoint_state, latest_checkpoint
from trainhooks.checkpoint.saver import CommittedSave, Saver
from trainhooks.checkpoint.saving.background import BackgroundWriter
from trainhooks.checkpoint.saving.snapshot import SnapshotPool
from trainhooks.session.session import Session


class GatedClock:
    """A clock that, once closed, blocks its caller until opened, or raises when armed.

    A background save reads the saver's clock while committing (retention records the
    time), so a closed gate holds a save in flight for as long as a test needs.
    """

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.gate = threading.Event()
        self.gate.set()
        self.error: BaseException | None = None

    def __call__(self) -> float:
        self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.now


def _listed(directory: Path) -> list[str]:
    ckpt = get_checkpoint_state(str(directory))
    return [] if ckpt is None else list(ckpt.all_model_checkpoint_paths)


def _restored(prefix: str, like: dict[str, Any]) -> dict[str, Any]:
    state = {k: np.zeros_like(v) for k, v in like.items()}
    Saver().restore(Session(state), prefix)
    return state


def _while_pending(saver: Saver, step: Callable[[], object] = lambda: None) -> None:
    """Call ``step()`` until ``saver`` has no save in flight, pausing between calls (the
    writer thread needs the CPU more than this loop on a busy machine); fail, not hang."""
    end = time.monotonic() + 100
    while saver.pending is not None:
        if time.monotonic() > end:
            pytest.fail(f"{saver.pending} still in flight after 100 s")
        step()
        time.sleep(0.01)


# ---- the snapshot ----------------------------------------------------------------------


def test_snapshot_is_consistent_when_state_changes_right_after_save(tmp_path: Path) -> None:
    w = np.arange(4 * 2**20, dtype=np.float32)  # 16 MiB: the write takes a while
    b = np.ones(7, np.float64)
    sess = Session({"w": w, "b": b}, global_step=3)
    saver = Saver(async_save=True)
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=3)
    assert prefix is not None
    # Training goes on in place, for as long as the save is in flight.
    w += 1.0
    b *= 2.0
    _while_pending(saver, lambda: w.__iadd__(1.0))
    saver.wait()
    restored = _restored(prefix, {"w": w, "b": b})
    np.testing.assert_array_equal(restored["w"], np.arange(4 * 2**20, dtype=np.float32))
    np.testing.assert_array_equal(restored["b"], np.ones(7))
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()
        assert ckpt.global_step == 3


def test_torch_module_and_optimizer_snapshot_is_consistent(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_avg = opt.state_dict()["state"][0]["exp_avg"].clone()
    sess = Session({"model": model, "opt": opt}, global_step=1)
    saver = Saver(async_save=True)
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=1)
    for _ in range(3):  # in-place updates right after save() returned
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
    saver.wait()
    assert prefix is not None
    model2 = torch.nn.Linear(64, 32)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.1)
    Saver().restore(Session({"model": model2, "opt": opt2}), prefix)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], saved_avg)


def test_pool_copies_and_reuses_buffers() -> None:
    pool = SnapshotPool()
    w = np.arange(10, dtype=np.float32)
    first = pool.take({"w": w, "n": 3})
    assert not np.shares_memory(np.frombuffer(first.tensors["w"].buffer, np.uint8), w)
    address = np.frombuffer(first.tensors["w"].buffer, np.uint8).ctypes.data
    w[:] = -1.0
    assert np.frombuffer(first.tensors["w"].buffer, np.float32)[3] == 3.0
    second = pool.take({"w": w})
    assert np.frombuffer(second.tensors["w"].buffer, np.uint8).ctypes.data == address
    assert np.frombuffer(second.tensors["w"].buffer, np.float32)[3] == -1.0
    assert pool.nbytes == w.nbytes
    # A new shape gets a new buffer; entries the state dropped are released.
    third = pool.take({"v": np.zeros((2, 3), np.int64)})
    assert third.tensors["v"].shape == (2, 3)
    assert pool.nbytes == 48
    pool.clear()
    assert pool.nbytes == 0


def test_pool_copy_leaf_copies_host_tensors() -> None:
    torch = pytest.importorskip("torch")
    pool = SnapshotPool()
    t = torch.arange(6, dtype=torch.float32)
    data = pool.copy_leaf("t", t)
    assert data is not None and data.dtype == "F32" and data.shape == (6,)
    t.add_(1.0)
    pool.synchronize()
    np.testing.assert_array_equal(np.frombuffer(data.buffer, np.float32), np.arange(6.0))
    assert pool.copy_leaf("s", "not an array") is None


_needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="torch.cuda is not available: no GPU on this machine"
)

# GPU clock cycles a "long step" spins for (torch.cuda._sleep): about 1 s at the 1.5 to
# 2 GHz of current GPUs, so that what the host does meanwhile (queueing a snapshot,
# calling a state_dict) ends before the step does however fast the GPU and busy the host.
_LONG_STEP_CYCLES = 2_000_000_000


@_needs_cuda
def test_cuda_snapshot_is_ordered_after_the_step_and_before_the_next() -> None:
    """The side-stream copies see what the step queued, and the loop's next kernels
    (in place, on the current stream) cannot reach a tensor before it is copied."""
    pool = SnapshotPool()
    w = torch.zeros(2**22, device="cuda")  # 16 MiB
    pool.take({"w": w})  # pinned buffer and side stream made once, outside what is checked
    torch.cuda.synchronize()
    torch.cuda._sleep(_LONG_STEP_CYCLES)  # a long step: the stream is busy for a while...
    w.add_(1.0)  # ...then writes the values the snapshot must hold
    flat = pool.take({"w": w}, wait=False)
    step_done = torch.cuda.Event()
    step_done.record()
    queued_only = not step_done.query()  # take() returned while the step still ran
    w.add_(100.0)  # the next step, in place, straight after the snapshot
    pool.synchronize()
    saved = np.frombuffer(flat.tensors["w"].buffer, np.float32)
    assert queued_only
    assert (saved == 1.0).all()
    torch.cuda.synchronize()
    assert (w == 101.0).all()
    again = pool.take({"w": w})  # the same pinned buffer, the new values
    assert (np.frombuffer(again.tensors["w"].buffer, np.float32) == 101.0).all()
    assert pool.nbytes == w.numel() * 4


@_needs_cuda
def test_cuda_snapshot_waits_for_tensors_a_state_dict_computes() -> None:
    """A ``state_dict()`` called during the walk queues kernels after earlier leaves were
    seen: the copies must still come after them."""

    class Ema:
        def __init__(self) -> None:
            self.avg = torch.zeros(2**22, device="cuda")

        def state_dict(self) -> dict[str, Any]:
            torch.cuda._sleep(_LONG_STEP_CYCLES)
            return {"avg": self.avg + 1.0}  # computed on the device, after "a" was seen

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.avg.copy_(state["avg"])

    flat = SnapshotPool().take({"a": torch.zeros(4, device="cuda"), "ema": Ema()})
    assert (np.frombuffer(flat.tensors["ema/avg"].buffer, np.float32) == 1.0).all()


@_needs_cuda
def test_cuda_sources_of_every_layout_are_copied_exactly() -> None:
    base = torch.randn(64, 48, device="cuda")
    state = {
        "transposed": base.t(),  # not contiguous: converted on the device
        "strided": base[::2, ::3],
        "conj": torch.randn(5, 3, dtype=torch.complex64, device="cuda").conj(),
        "neg": torch.randn(7, device="cuda")._neg_view(),
        "bf16": torch.randn(33, device="cuda").to(torch.bfloat16),
    }
    expected = {k: v.resolve_conj().resolve_neg().contiguous().cpu() for k, v in state.items()}
    flat = SnapshotPool().take(state)
    for name, want in expected.items():
        got = flat.tensors[name]
        assert got.shape == tuple(want.shape)
        assert bytes(got.buffer) == want.view(torch.uint8).numpy().tobytes(), name


@_needs_cuda
def test_cuda_model_and_optimizer_saved_in_the_background_as_they_were(tmp_path: Path) -> None:
    model = torch.nn.Linear(2048, 2048).cuda()  # 16 MiB of weights, twice that of Adam state
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(64, 2048, device="cuda")).sum().backward()
    opt.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}  # queued: no host sync
    sess = Session({"model": model, "opt": opt}, global_step=1)
    saver = Saver(async_save=True)
    torch.cuda._sleep(_LONG_STEP_CYCLES)  # the copies queue behind a busy stream...
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=1)
    for _ in range(3):  # ...and in-place updates queue right after save() returned
        model(torch.randn(64, 2048, device="cuda")).sum().backward()
        opt.step()
    saver.wait()
    assert prefix is not None
    restored = torch.nn.Linear(2048, 2048).cuda()
    restored_opt = torch.optim.Adam(restored.parameters())
    Saver().restore(Session({"model": restored, "opt": restored_opt}), prefix)
    for k, v in restored.state_dict().items():
        assert v.device.type == "cuda" and torch.equal(v, saved[k]), k
        assert not torch.equal(v, model.state_dict()[k]), k  # the training did move on
    saver.close()


# ---- one save in flight, waiting, committed saves --------------------------------------


def test_save_returns_before_commit_and_wait_commits(tmp_path: Path) -> None:
    clock = GatedClock()
    sess = Session({"w": np.ones(1000)}, global_step=5)
    saver = Saver(async_save=True, clock=clock)
    clock.gate.clear()
    prefix = saver.save(sess, str(tmp_path / "model.ckpt"), global_step=5)
    assert saver.pending == prefix
    assert latest_checkpoint(str(tmp_path)) is None  # not committed yet
    assert saver.poll_committed() == []
    threading.Thread(target=clock.gate.set).start()
    saver.wait()
    assert saver.pending is None
    assert latest_checkpoint(str(tmp_path)) == prefix
    assert saver.last_checkpoints == [prefix]
    assert saver.poll_committed() == [CommittedSave(str(prefix), 5)]
    assert saver.poll_committed() == []


def test_next_save_waits_for_the_one_in_flight(tmp_path: Path) -> None:
    sess = Session({"w": np.zeros(2**20)})
    saver = Saver(async_save=True, max_to_keep=2)
    base = str(tmp_path / "model.ckpt")
    p1 = saver.save(sess, base, global_step=1)
    sess.state["w"][:] = 1.0
    p2 = saver.save(sess, base, global_step=2)
    # The second save() returned only once the first had committed.
    assert _listed(tmp_path) == [p1]
    assert saver.poll_committed() == [CommittedSave(str(p1), 0)]
    p3 = saver.save(sess, base, global_step=3)
    saver.close()
    assert _listed(tmp_path) == [p2, p3]  # retention ran in the background
    assert not os.path.exists(str(p1))
    assert [c.prefix for c in saver.poll_committed()] == [p2, p3]
    assert p2 is not None
    np.testing.assert_array_equal(_restored(p2, {"w": sess.state["w"]})["w"], 1.0)


def test_restore_waits_for_the_save_in_flight(tmp_path: Path) -> None:
    clock = GatedClock()
    w = np.full(1000, 7.0)
    saver = Saver(async_save=True, clock=clock)
    clock.gate.clear()
    prefix = saver.save(Session({"w": w}), str(tmp_path / "m"), global_step=1)
    assert prefix is not None and saver.pending == prefix
    threading.Thread(target=clock.gate.set).start()
    target = Session({"w": np.zeros(1000)})
    saver.restore(target, prefix)
    np.testing.assert_array_equal(target.state["w"], 7.0)


def test_restore_latest_waits_for_another_savers_save_into_the_directory(tmp_path: Path) -> None:
    # A recovering session restores with the scaffold's saver while the hook's own
    # saver may still be committing: the restore must see that newest checkpoint.
    clock = GatedClock()
    writer = Saver(async_save=True, clock=clock)
    sess = Session({"w": np.full(1000, 1.0)}, global_step=1)
    writer.save(sess, str(tmp_path / "m"), global_step=1)
    writer.wait()
    sess.state["w"][:] = 2.0
    sess.global_step = 2
    clock.gate.clear()
    prefix = writer.save(sess, str(tmp_path / "m"), global_step=2)
    assert writer.pending == prefix
    threading.Thread(target=clock.gate.set).start()
    target = Session({"w": np.zeros(1000)})
    assert Saver().restore_latest(target, tmp_path) == prefix
    np.testing.assert_array_equal(target.state["w"], 2.0)
    assert target.global_step == 2
    assert writer.poll_committed() == [CommittedSave(str(tmp_path / "m-1"), 1), (prefix, 2)]


def test_close_completes_the_save_in_flight(tmp_path: Path) -> None:
    clock = GatedClock()
    saver = Saver(async_save=True, clock=clock)
    clock.gate.clear()
    prefix = saver.save(Session({"w": np.ones(10)}), str(tmp_path / "m"), global_step=9)
    threading.Thread(target=clock.gate.set).start()
    saver.close()
    assert saver.pending is None
    assert latest_checkpoint(str(tmp_path)) == prefix
    # Still usable after close: the next save allocates its buffers again.
    saver.save(Session({"w": np.ones(10)}), str(tmp_path / "m"), global_step=10)
    saver.close()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-10")


# ---- errors ------------------------------------------------------------------------------


def test_background_error_surfaces_on_the_training_thread(tmp_path: Path) -> None:
    clock = GatedClock()
    sess = Session({"w": np.ones(10)})
    saver = Saver(async_save=True, clock=clock)
    clock.error = OSError("disk quota exceeded")
    prefix = saver.save(sess, str(tmp_path / "m"), global_step=1)
    assert prefix is not None
    with pytest.raises(OSError, match="disk quota exceeded"):
        saver.wait()
    saver.wait()  # raised once, not again
    assert get_checkpoint_state(str(tmp_path)) is None  # never listed in the state file

    # Raised by poll_committed (the hook's step boundary) ...
    saver.save(sess, str(tmp_path / "m"), global_step=2)
    _while_pending(saver)  # done, its error not yet collected
    with pytest.raises(OSError, match="disk quota exceeded"):
        saver.poll_committed()
    assert saver.poll_committed() == []

    # ... and by the next save() when nobody looked.
    saver.save(sess, str(tmp_path / "m"), global_step=3)
    with pytest.raises(OSError, match="disk quota exceeded"):
        saver.save(sess, str(tmp_path / "m"), global_step=4)  # not started
    clock.error = None
    saver.save(sess, str(tmp_path / "m"), global_step=5)
    saver.wait()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "m-5")


def test_invalid_tensor_name_fails_in_the_background(tmp_path: Path) -> None:
    saver = Saver(async_save=True)
    saver.save(Session({"__metadata__": np.ones(2)}), str(tmp_path / "m"), global_step=1)
    with pytest.raises(ValueError, match="__metadata__"):
        saver.wait()
    assert get_checkpoint_state(str(tmp_path)) is None
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def test_committed_saves_are_returned_before_a_later_error() -> None:
    writer: BackgroundWriter[str] = BackgroundWriter()
    writer.submit("a", lambda: "a")
    writer.wait()

    def fail() -> str:
        raise RuntimeError("b failed")

    writer.submit("b", fail)
    writer.wait(raise_error=False)
    assert writer.poll() == ["a"]
    with pytest.raises(RuntimeError, match="b failed"):
        writer.poll()
    gate = threading.Event()
    writer.submit("c", lambda: str(gate.wait()))
    with pytest.raises(RuntimeError, match="still in flight"):
        writer.submit("d", lambda: "d")
    gate.set()
    writer.close()
    assert writer.poll() == ["True"]


# ---- the listener protocol a CheckpointSaverHook follows ---------------------------------


def _train_with_listener(tmp_path: Path, async_save: bool) -> list[str]:
    """Train 10 steps, saving every 3, delivering after_save as CheckpointSaverHook does."""
    events: list[str] = []
    sess = Session({"w": np.zeros(2**16)})
    saver = Saver(async_save=async_save, max_to_keep=2)
    base = str(tmp_path / ("async" if async_save else "sync") / "model.ckpt")
    os.makedirs(os.path.dirname(base))
    in_flight: dict[str, int] = {}

    def after_save(prefix: str, step: int) -> None:
        assert latest_checkpoint(os.path.dirname(base)) == prefix  # committed and listed
        with open_checkpoint(prefix) as ckpt:
            ckpt.verify()
        events.append(f"after_save {step}")

    def step_boundary() -> None:
        for done in saver.poll_committed():
            after_save(done.prefix, in_flight.pop(done.prefix))

    def save(step: int) -> None:
        if async_save:  # the previous save's after_save comes before this before_save
            saver.wait()
            step_boundary()
        events.append(f"before_save {step}")
        prefix = saver.save(sess, base, global_step=step)
        assert prefix is not None
        if async_save:
            in_flight[prefix] = step
        else:
            after_save(prefix, step)

    for step in range(1, 11):
        step_boundary()
        sess.state["w"] += 1.0
        sess.global_step = step
        events.append(f"step {step}")
        if step % 3 == 0:
            save(step)
    # end(): the pending save completes and is delivered before end returns.
    save(10)
    saver.wait()
    step_boundary()
    events.append("end")
    assert not in_flight
    return events


def test_listener_order_is_the_same_as_with_synchronous_saving(tmp_path: Path) -> None:
    sync = _train_with_listener(tmp_path, async_save=False)
    background = _train_with_listener(tmp_path, async_save=True)
    assert [e for e in background if not e.startswith("step")] == [
        e for e in sync if not e.startswith("step")
    ]
    assert sync[-3:] == ["before_save 10", "after_save 10", "end"]
    # In the background every after_save comes at a step boundary after its save.
    assert background.index("after_save 3") > background.index("before_save 3")


# ---- interpreter exit ---------------------------------------------------------------------


def _run_script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    script = textwrap.dedent(
        """
        import os, sys
        import numpy as np
        from trainhooks.checkpoint.saver import Saver
        from trainhooks.session.session import Session
        directory = sys.argv[1]
        sess = Session({"w": np.full(16 * 2**20, 3.0, np.float32)}, global_step=1)
        saver = Saver(async_save=True)
        """
    ) + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


@pytest.mark.slow  # a second process exits mid-save
def test_interpreter_exit_finishes_the_save_in_flight(tmp_path: Path) -> None:
    proc = _run_script(
        tmp_path,
        """
        prefix = saver.save(sess, os.path.join(directory, "model.ckpt"), global_step=1)
        print("pending", saver.pending == prefix, flush=True)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "pending True"  # it was still in flight at exit
    prefix = str(tmp_path / "model.ckpt-1")
    assert latest_checkpoint(str(tmp_path)) == prefix
    with open_checkpoint(prefix) as ckpt:
        ckpt.verify()


@pytest.mark.slow  # a second process dies mid-save
def test_abrupt_exit_never_leaves_a_listed_partial_checkpoint(tmp_path: Path) -> None:
    proc = _run_script(
        tmp_path,
        """
        saver.save(sess, os.path.join(directory, "model.ckpt"), global_step=1)
        saver.wait()
        sess.global_step = 2
        saver.save(sess, os.path.join(directory, "model.ckpt"), global_step=2)
        os._exit(0)  # no atexit: the save in flight is cut short
        """,
    )
    assert proc.returncode == 0, proc.stderr
    listed = _listed(tmp_path)
    assert listed[0] == str(tmp_path / "model.ckpt-1")
    for prefix in listed:  # whatever is listed is complete
        with open_checkpoint(prefix) as ckpt:
            ckpt.verify()
    # The next saver cleans up what the cut-short save left.
    saver = Saver(async_save=True)
    saver.save(Session({"w": np.zeros(1)}), str(tmp_path / "other"), global_step=1)
    saver.close()
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []


def _every_torch_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (6, 8), dtype=torch.uint8, generator=gen)
    tensors = {}
    for dtype in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
        torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
    ):  # fmt: skip
        itemsize = torch.empty((), dtype=dtype).element_size()
        if dtype is torch.bool:
            tensors[str(dtype)] = raw[:, :2] % 2 == 1
        else:
            tensors[str(dtype)] = raw.reshape(-1)[: 8 * itemsize].view(dtype).clone()
    tensors["strided bf16"] = tensors["torch.bfloat16"].reshape(2, 4).t()  # a view of it
    return tensors


def test_every_torch_dtype_round_trips_through_a_background_save(tmp_path: Path) -> None:
    state = _every_torch_dtype()
    expected = {k: v.clone() for k, v in state.items()}
    saver = Saver(async_save=True)
    prefix = saver.save(Session(state), str(tmp_path / "model.ckpt"), global_step=1)
    for v in state.values():  # the snapshot must not alias the state
        if v.dtype is torch.bool:
            v.fill_(False)
        elif v.is_contiguous():  # (the strided view is zeroed through its base)
            v.view(torch.uint8).zero_()
    saver.wait()
    target = {k: torch.zeros_like(v) for k, v in expected.items()}
    Saver().restore(Session(target), prefix)
    for k, v in expected.items():
        assert target[k].dtype == v.dtype, k
        assert target[k].contiguous().view(torch.uint8).equal(v.contiguous().view(torch.uint8)), k
