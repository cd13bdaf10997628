"""``Saver(atomic_restore=False)``: large tensors read straight into the state, checked there.

Each large tensor (a checksum run of its own, at least 4 MiB, into C-contiguous host
memory) is read from the data file into the user's memory and hashed as it lands
(``MappedCheckpoint.read_runs``); everything else is checksummed from the mapping and
copied afterwards, as in an atomic restore. These tests restore every layout that way,
from cached and from evicted files, check that the large tensors really took the direct
path (the restore logs how many), and that a corrupt checkpoint still raises
``DataLossError`` and says what it already wrote.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.helpers.checkpoints import cache, evict, flip_byte_of
from tests.helpers.torch_models import trained_mlp

from trainhooks import errors
from trainhooks.checkpoint.format import mapped_checkpoint
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saver import Saver
from trainhooks.checkpoint.saving.write import write_checkpoint
from trainhooks.checkpoint.state.host_copies import PARALLEL_COPY_BYTES
from trainhooks.checkpoint.state.tree import flatten_state
from trainhooks.session.session import Session

torch = pytest.importorskip("torch")

_BIG = PARALLEL_COPY_BYTES // 4 + 2**20 + 3  # float32s: over the limit and over two 8 MiB steps
_LOGGER = "trainhooks.checkpoint.saving.restore"


def _state(seed: int) -> dict[str, Any]:
    """Large tensors that can be read in place, and every kind that cannot."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    return {
        "big": rng.standard_normal(_BIG).astype(np.float32),
        "big_2d": rng.standard_normal((1100, 1000)),  # 8.8 MB of float64
        "big_fortran": np.asfortranarray(rng.standard_normal((1100, 1000))),  # not C order
        "torch": {
            "big": torch.randn(_BIG),
            "param": torch.nn.Parameter(torch.randn(1200, 1100)),
            "transposed": torch.randn(1100, 1200).t(),  # not contiguous
            "bf16": torch.randn(_BIG).to(torch.bfloat16),
            "small": torch.randn(10),
        },
        "small": {f"t{i:03d}": rng.standard_normal(300).astype(np.float32) for i in range(400)},
        "scalar": np.array(2.5),
    }


#: the leaves of _state read in place: large, C-contiguous host memory
_DIRECT = {"big", "big_2d", "torch/big", "torch/param", "torch/bf16"}


def _leaves(state: Any, path: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for key, value in state.items():
            out.update(_leaves(value, f"{path}/{key}" if path else key))
        return out
    return {path: state}


def _bytes(state: dict[str, Any]) -> dict[str, bytes]:
    out = {}
    for key, value in _leaves(state).items():
        if isinstance(value, torch.Tensor):
            value = value.detach().contiguous().view(torch.uint8).numpy()
        out[key] = np.ascontiguousarray(value).tobytes()
    return out


def _save(state: dict[str, Any], directory: Path, step: int = 3) -> str:
    prefix = Saver(max_to_keep=None).save(
        Session(state), str(directory / "model.ckpt"), global_step=step
    )
    assert prefix is not None
    return prefix


def _read_in_place(caplog: pytest.LogCaptureFixture) -> tuple[int, int]:
    """(tensors, bytes) the last restore logged as read straight into the state."""
    found = [r.args for r in caplog.records if r.msg.startswith("Read %d tensors")]
    assert found, "the restore read nothing in place"
    return found[-1]  # type: ignore[return-value]


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "dropped from the cache"])
def test_every_layout_restores_exactly_and_large_tensors_in_place(
    tmp_path: Path, cached: bool, caplog: pytest.LogCaptureFixture
) -> None:
    state = _state(0)
    saved = _bytes(state)
    prefix = _save(state, tmp_path)
    restored = _state(1)  # other values, to be overwritten in place
    objects = _leaves(restored)
    if cached:
        cache(prefix)
    else:
        evict(prefix)
    caplog.set_level(logging.DEBUG, logger=_LOGGER)
    Saver(atomic_restore=False).restore(Session(restored), prefix)
    assert _bytes(restored) == saved
    assert _read_in_place(caplog) == (len(_DIRECT), sum(len(saved[key]) for key in _DIRECT))
    for key, value in _leaves(restored).items():
        assert value is objects[key], f"{key} was replaced, not restored in place"


def test_a_module_and_optimizer_restore_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt, params, moments = trained_mlp()
    state = {"model": model, "optimizer": opt}
    prefix = _save(state, tmp_path)
    weight = model[0].weight
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    for moment in opt.state.values():
        moment["exp_avg"].zero_()
    evict(prefix)
    caplog.set_level(logging.DEBUG, logger=_LOGGER)
    Saver(atomic_restore=False).restore(Session(state), prefix)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    for k, v in opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], moments[k]), k
    assert model[0].weight is weight
    tensors, _ = _read_in_place(caplog)
    assert tensors >= 1  # the 1200 x 1200 weight (5.8 MB) at least


@pytest.mark.parametrize("tensor", ["big", "torch/param"])
@pytest.mark.parametrize("where", [0.0, 1.0])
def test_a_corrupt_large_tensor_raises_and_says_what_was_written(
    tmp_path: Path, tensor: str, where: float
) -> None:
    prefix = _save(_state(0), tmp_path)
    flip_byte_of(prefix, tensor, where)
    target = _state(1)
    before = _bytes(target)
    with pytest.raises(errors.DataLossError, match=r"checksum mismatch.*atomic_restore=False"):
        Saver(atomic_restore=False).restore(Session(target), prefix)
    after = _bytes(target)
    # Only tensors read in place may have changed; everything copied afterwards is intact.
    assert {k for k in before if before[k] != after[k]} <= _DIRECT
    assert after[tensor] != before[tensor]  # the corrupt bytes landed: that is the trade-off


def test_a_corrupt_small_tensor_raises_and_small_ones_stay(tmp_path: Path) -> None:
    prefix = _save(_state(0), tmp_path)
    flip_byte_of(prefix, "small/t123")
    target = _state(1)
    before = _bytes(target)
    with pytest.raises(errors.DataLossError, match=r"small/t123|checksummed together"):
        Saver(atomic_restore=False).restore(Session(target), prefix)
    after = _bytes(target)
    assert {k for k in before if before[k] != after[k]} <= _DIRECT


def test_a_state_that_does_not_fit_reads_nothing(tmp_path: Path) -> None:
    prefix = _save(_state(0), tmp_path)
    target = _state(1)
    target["torch"]["small"] = torch.zeros(11)  # the checkpoint holds 10
    before = _bytes(target)
    with pytest.raises(errors.StateMismatchError, match="small"):
        Saver(atomic_restore=False).restore(Session(target), prefix)
    assert _bytes(target) == before


def test_restore_latest_goes_on_to_an_older_checkpoint_and_overwrites_what_was_read(
    tmp_path: Path,
) -> None:
    older, newer = _state(0), _state(1)
    saver = Saver(max_to_keep=5, atomic_restore=False)
    saver.save(Session(older, global_step=1), str(tmp_path / "model.ckpt"), global_step=1)
    newest = saver.save(Session(newer), str(tmp_path / "model.ckpt"), global_step=2)
    assert newest is not None
    flip_byte_of(newest, "torch/big", 1.0)  # found last: everything large was read
    target = _state(2)
    session = Session(target)
    saver.restore_latest(session, str(tmp_path))
    assert _bytes(target) == _bytes(older)
    assert session.global_step == 1


def test_read_runs_refuses_a_file_truncated_after_it_was_opened(tmp_path: Path) -> None:
    state = {"w": np.arange(_BIG, dtype=np.float32)}
    prefix = str(tmp_path / "ckpt-1")
    write_checkpoint(prefix, flatten_state(state), global_step=1)
    target = np.zeros(_BIG, np.float32)
    with open_checkpoint(prefix) as ckpt:
        entry = ckpt.entry("w")
        address = np.frombuffer(ckpt._views[entry.file], np.uint8).ctypes.data + entry.start
        run = ckpt.claim_run(address, entry.end - entry.start)
        assert run is not None
        os.truncate(Path(prefix) / entry.file, entry.start + 1000)
        with pytest.raises(
            errors.DataLossError, match=r"ends at byte .* shorter than when it was opened"
        ):
            ckpt.read_runs([(target.view(np.uint8), run)])


def _claimed(ckpt: Any, targets: dict[str, np.ndarray[Any, Any]]) -> list[Any]:
    """``read_runs`` jobs: each target with the run of its name, claimed."""
    jobs = []
    for name, target in targets.items():
        entry = ckpt.entry(name)
        base = np.frombuffer(ckpt._views[entry.file], np.uint8).ctypes.data
        run = ckpt.claim_run(base + entry.start, entry.end - entry.start)
        assert run is not None
        jobs.append((target.view(np.uint8), run))
    return jobs


@given(
    runs=st.lists(st.tuples(st.integers(-1, 3), st.integers(0, 40)), max_size=8),
    step=st.integers(1, 32),
    most=st.integers(1, 4),
)
def test_steps_cover_every_run_in_reads_of_at_most_a_step(
    runs: list[tuple[int, int]], step: int, most: int
) -> None:
    """``_steps`` of (gap before, size) runs, each read done as a file would (byte ``p``
    of the file is ``p % 251``): every run ends up with its own bytes, each read is at
    most ``step`` bytes back to back in at most ``most`` pieces, the reads go front to
    back, and each run's last piece is marked once, in order. A gap of -1 repeats the
    run before (one run read into two destinations: read again, from its start)."""
    laid: list[tuple[int, memoryview, int]] = []
    position, repeats = 0, False
    for index, (gap, size) in enumerate(runs):
        if gap < 0 and laid:  # the same run again, into other memory
            start, out, _ = laid[-1]
            laid.append((start, memoryview(bytearray(b"\xff" * len(out))), index))
            repeats = True
            continue
        position += max(gap, 0)
        laid.append((position, memoryview(bytearray(b"\xff" * size)), index))
        position += size
    reads = list(mapped_checkpoint._steps(laid, step, most))
    ends = []
    for at, pieces in reads:
        assert sum(len(piece) for piece, _, _ in pieces) <= step and len(pieces) <= most
        for piece, index, last in pieces:
            piece[:] = bytes((at + k) % 251 for k in range(len(piece)))
            at += len(piece)
            ends += [index] if last else []
    assert repeats or [at for at, _ in reads] == sorted(at for at, _ in reads)
    assert ends == [index for _, _, index in laid]
    for start, out, _ in laid:
        assert bytes(out) == bytes((start + k) % 251 for k in range(len(out)))


class _Trickle:
    """A data file that reads at most ``most`` bytes per call, into one buffer only when
    ``vectored`` is False (as a storage without ``readinto_many``)."""

    def __init__(self, handle: Any, most: int, vectored: bool) -> None:
        self._handle, self._most, self.calls = handle, most, 0
        # None: not there (as the reader looks it up), not the handle's own
        self.readinto_many = self._readinto_many if vectored else None

    def readinto(self, position: int, out: memoryview) -> int:
        self.calls += 1
        return int(self._handle.readinto(position, out[: self._most]))

    def _readinto_many(self, position: int, buffers: list[memoryview]) -> int:
        self.calls += 1
        left, capped = self._most, []
        for buffer in buffers:
            if left:
                capped.append(buffer[:left])
                left -= len(capped[-1])
        return int(self._handle.readinto_many(position, capped))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


@pytest.mark.parametrize("vectored", [True, False], ids=["preadv", "readinto"])
def test_short_reads_are_continued_across_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vectored: bool
) -> None:
    """Reads that return less than asked (a storage may) continue where they stopped,
    across the runs one read spans, with or without a vectored read."""
    monkeypatch.setattr(mapped_checkpoint, "_READ_STEP", 3 * 2**20 + 7)
    rng = np.random.default_rng(0)
    state = {f"t{i}": rng.standard_normal(2**18 + 5 * i).astype(np.float32) for i in range(5)}
    prefix = str(tmp_path / "ckpt-1")
    write_checkpoint(prefix, flatten_state(state), global_step=1)
    targets = {k: np.zeros_like(v) for k, v in state.items()}
    with open_checkpoint(prefix) as ckpt:
        jobs = _claimed(ckpt, targets)
        trickles = {file: _Trickle(ckpt._files[file], 300_001, vectored) for file in ckpt._files}
        ckpt._files.update(trickles)
        assert ckpt.read_runs(jobs) == sum(v.nbytes for v in state.values())
    calls = sum(trickle.calls for trickle in trickles.values())
    assert calls >= sum(v.nbytes for v in state.values()) // 300_001  # every read was short
    for name, value in state.items():
        assert np.array_equal(targets[name], value), name


def test_claim_run_takes_only_a_whole_unchecked_run(tmp_path: Path) -> None:
    state = {"w": np.arange(_BIG, dtype=np.float32), "a": np.ones(3), "b": np.zeros(3)}
    prefix = str(tmp_path / "ckpt-1")
    write_checkpoint(prefix, flatten_state(state), global_step=1)
    with open_checkpoint(prefix) as ckpt:
        entry = ckpt.entry("w")
        base = np.frombuffer(ckpt._views[entry.file], np.uint8).ctypes.data
        size = entry.end - entry.start
        assert ckpt.claim_run(base + entry.start, size) is not None
        assert ckpt.claim_run(base + entry.start, size - 1) is None  # part of the run
        assert ckpt.claim_run(base + entry.start + 4, size - 4) is None  # not its start
        assert ckpt.claim_run(np.zeros(8).ctypes.data, 8) is None  # not in any file
        small = ckpt.entry("a")  # shares its run with "b"
        assert ckpt.claim_run(base + small.start, small.end - small.start) is None
        ckpt.verify()
        assert ckpt.claim_run(base + entry.start, size) is None  # already checked


def test_atomic_restore_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="atomic_restore"):
        Saver(atomic_restore="no")  # type: ignore[arg-type]


def test_a_dict_of_large_arrays_in_one_file_is_read_in_place(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One data file and a dict of plain arrays: the restore plans them as one batched
    run (``plan_run``); its large arrays are still read in place."""
    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal(_BIG).astype(np.float32) for i in range(4)}
    state.update({f"s{i}": rng.standard_normal(100).astype(np.float32) for i in range(50)})
    saved = _bytes(state)
    prefix = _save(state, tmp_path)
    with open_checkpoint(prefix) as ckpt:
        assert len(ckpt.manifest.files) == 1
    target = {k: np.zeros_like(v) for k, v in state.items()}
    caplog.set_level(logging.DEBUG, logger=_LOGGER)
    Saver(atomic_restore=False).restore(Session(target), prefix)
    assert _bytes(target) == saved
    assert _read_in_place(caplog) == (4, 4 * _BIG * 4)


def test_one_array_under_two_names_is_read_in_place_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Tied weights restored from a checkpoint of untied ones: two runs, one memory. Two
    threads reading into it at once would hash each other's bytes; one is read in place,
    the other copied after, as an atomic restore does."""
    rng = np.random.default_rng(0)
    saved = {"a": rng.standard_normal(_BIG).astype(np.float32)}
    saved["b"] = rng.standard_normal(_BIG).astype(np.float32)
    prefix = _save(saved, tmp_path)
    shared = np.zeros(_BIG, np.float32)
    caplog.set_level(logging.DEBUG, logger=_LOGGER)
    for _ in range(3):
        shared[:] = 0
        Saver(atomic_restore=False).restore(Session({"a": shared, "b": shared}), prefix)
        assert np.array_equal(shared, saved["a"]) or np.array_equal(shared, saved["b"])
        assert _read_in_place(caplog)[0] == 1


def test_a_corrupt_checkpoint_that_does_not_fit_is_reported_as_corrupt(tmp_path: Path) -> None:
    """restore_latest goes on past a corrupt checkpoint, but stops at one that does not
    fit: a checkpoint both corrupt and unfit must read as corrupt, as when atomic."""
    prefix = _save(_state(0), tmp_path)
    flip_byte_of(prefix, "big")
    target = _state(1)
    target["torch"]["small"] = torch.zeros(11)
    before = _bytes(target)
    with pytest.raises(errors.DataLossError, match="'big'"):
        Saver(atomic_restore=False).restore(Session(target), prefix)
    assert _bytes(target) == before


def test_a_restore_with_strict_false_stays_atomic(tmp_path: Path) -> None:
    """The older checkpoint lacks "new": a one-pass read of the newer, corrupt one would
    leave its bytes there while restore_latest reports success."""
    older = _state(0)
    newer = {**_state(1), "new": np.arange(_BIG, dtype=np.float32)}
    saver = Saver(max_to_keep=5, atomic_restore=False)
    saver.save(Session(older, global_step=1), str(tmp_path / "model.ckpt"), global_step=1)
    newest = saver.save(Session(newer), str(tmp_path / "model.ckpt"), global_step=2)
    assert newest is not None
    flip_byte_of(newest, "torch/param", 1.0)
    target = {**_state(2), "new": np.full(_BIG, 7.0, np.float32)}
    saver.restore_latest(Session(target), str(tmp_path), strict=False)
    assert _bytes({k: v for k, v in target.items() if k != "new"}) == _bytes(older)
    assert (target["new"] == 7.0).all()


class _Watched:
    """A data file whose every read first calls :meth:`_before` with its position; all
    else is the wrapped handle's."""

    _handle: Any

    def readinto(self, position: int, out: memoryview) -> int:
        self._before(position)
        return int(self._handle.readinto(position, out))

    def readinto_many(self, position: int, buffers: list[memoryview]) -> int:
        self._before(position)
        return int(self._handle.readinto_many(position, buffers))

    def _before(self, position: int) -> None:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class _OrderedReads(_Watched):
    """A data file whose reads are put in order across two threads: a read in ``held`` (a
    byte range) sets ``entered`` and waits until ``release`` is set; a read in ``after``
    waits until ``entered`` is set. So the long run's thread is inside its second step,
    and only there, when the other file's run is read and fails, however loaded the
    machine."""

    def __init__(
        self,
        handle: Any,
        *,
        held: range = range(0),
        after: range = range(0),
        entered: threading.Event,
        release: threading.Event,
    ) -> None:
        self._handle, self._held, self._after = handle, held, after
        self._entered, self._release = entered, release

    def _before(self, position: int) -> None:
        if position in self._held:
            self._entered.set()
            assert self._release.wait(30), "no run failed"
        elif position in self._after:
            assert self._entered.wait(30), "the long run's second step was never reached"


def test_the_first_failure_stops_the_other_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long run is being read when a run of another file fails: the long one stops at
    its next step and the runs not yet started, in either file, are never read into
    their destinations (but for what the failing run's last read took of the next)."""
    step = 2**20
    monkeypatch.setattr(mapped_checkpoint, "_READ_STEP", step)
    rng = np.random.default_rng(0)
    state = {"long": rng.standard_normal(6 * step // 4).astype(np.float32)}
    state.update({f"b{i}": rng.standard_normal(_BIG).astype(np.float32) for i in range(6)})
    prefix = str(tmp_path / "ckpt-1")
    total = sum(v.nbytes for v in state.values())
    write_checkpoint(prefix, flatten_state(state), global_step=1, max_shard_bytes=total // 3)
    with open_checkpoint(prefix) as ckpt:
        entries = {name: ckpt.entry(name) for name in state}
    in_file: dict[str, list[str]] = {}  # each file's tensors, in file order
    for name, entry in sorted(entries.items(), key=lambda item: item[1].start):
        in_file.setdefault(entry.file, []).append(name)
    long = entries["long"]
    assert in_file[long.file][0] == "long" and len(in_file[long.file]) > 1
    # The failing run is the first of another file, with a run after it.
    bad = next(names[0] for file, names in in_file.items() if file != long.file and len(names) > 1)
    read_from = in_file[long.file] + in_file[entries[bad].file]  # two files, two threads
    flip_byte_of(prefix, bad)
    targets = {k: np.zeros_like(v) for k, v in state.items()}
    stop, entered = threading.Event(), threading.Event()
    with open_checkpoint(prefix) as ckpt:
        jobs = _claimed(ckpt, {name: targets[name] for name in read_from})
        files, failing = ckpt._files, entries[bad]
        held = range(long.start + step, long.end)
        files[long.file] = _OrderedReads(files[long.file], held=held, entered=entered, release=stop)
        after = range(failing.start, failing.end)
        files[failing.file] = _OrderedReads(
            files[failing.file], after=after, entered=entered, release=stop
        )
        # The failing run is read once the long run is in its second step, which waits
        # for the failure (it sets ``stop``) and is then read whole: the check comes per
        # step.
        with pytest.raises(errors.DataLossError, match=f"'{bad}'"):
            ckpt.read_runs(jobs, num_threads=2, stop=stop)
    # The run after the failing one shares its last read (one preadv up to the step,
    # where the two lie back to back): that much of it is read, no more.
    next_name = in_file[failing.file][1]
    next_run = entries[next_name]
    shared = -(failing.end - failing.start) % step if next_run.start == failing.end else 0
    assert not targets[next_name].view(np.uint8)[shared:].any()
    later = [name for name in read_from if name not in ("long", bad, next_name)]
    assert not any(targets[name].any() for name in later), "read after the failure"
    read = targets["long"].view(np.uint8)
    assert np.array_equal(read[: 2 * step], state["long"].view(np.uint8)[: 2 * step])
    assert not read[2 * step :].any(), "the long run was not stopped at its next step"


class _Recorded(_Watched):
    """A data file that records which thread read which position; its first read waits
    at ``together`` until every file's first read is there (the files read side by side,
    or the barrier breaks)."""

    def __init__(
        self, handle: Any, file: str, log: list[tuple[str, int, int]], together: threading.Barrier
    ) -> None:
        self._handle, self._file, self._log, self._together = handle, file, log, together
        self._first = True

    def _before(self, position: int) -> None:
        self._log.append((self._file, threading.get_ident(), position))
        if self._first:
            self._first = False
            self._together.wait()


def test_each_file_is_read_front_to_back_by_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel's readahead follows one sequential reader per file: two threads taking
    turns in one file were slower cold (200 MiB: 0.187 against 0.129 s at best)."""
    monkeypatch.setattr(mapped_checkpoint, "_READ_STEP", 2**20)
    rng = np.random.default_rng(0)
    state = {f"t{i}": rng.standard_normal(_BIG).astype(np.float32) for i in range(8)}
    prefix = str(tmp_path / "ckpt-1")
    total = sum(v.nbytes for v in state.values())
    write_checkpoint(prefix, flatten_state(state), global_step=1, max_shard_bytes=total // 2)
    targets = {k: np.zeros_like(v) for k, v in state.items()}
    log: list[tuple[str, int, int]] = []
    with open_checkpoint(prefix) as ckpt:
        jobs = _claimed(ckpt, targets)
        read = {run[0] for _, run in jobs}  # the files holding the runs
        assert 2 <= len(read) <= 4
        together = threading.Barrier(len(read), timeout=30)
        for file in read:
            ckpt._files[file] = _Recorded(ckpt._files[file], file, log, together)
        assert ckpt.read_runs(jobs, num_threads=4) == total
    assert all(np.array_equal(targets[k], v) for k, v in state.items())
    files = {file for file, _, _ in log}
    assert len(files) >= 2
    for file in files:
        reads = [(thread, position) for f, thread, position in log if f == file]
        assert len({thread for thread, _ in reads}) == 1, f"{file} read by several threads"
        positions = [position for _, position in reads]
        assert positions == sorted(positions), f"{file} not read front to back"
    assert len({thread for _, thread, _ in log}) == len(files)


def test_a_tensor_stored_once_is_read_into_each_of_two_arrays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One tensor under two names is stored once; restored into two separate arrays, the
    one run is read into both, each read checked on its own."""
    rng = np.random.default_rng(0)
    table, weight = rng.standard_normal(_BIG).astype(np.float32), torch.randn(_BIG)
    prefix = _save({"table": table, "again": [table], "w": weight, "tied": {"w": weight}}, tmp_path)
    t1, t2, w1, w2 = (
        np.zeros_like(table),
        np.zeros_like(table),
        torch.zeros(_BIG),
        torch.zeros(_BIG),
    )
    evict(prefix)
    caplog.set_level(logging.DEBUG, logger=_LOGGER)
    Saver(atomic_restore=False).restore(
        Session({"table": t1, "again": [t2], "w": w1, "tied": {"w": w2}}), prefix
    )
    assert np.array_equal(t1, table) and np.array_equal(t2, table)
    assert torch.equal(w1, weight) and torch.equal(w2, weight)
    assert _read_in_place(caplog) == (4, 4 * table.nbytes)  # each run into both arrays


def test_a_mismatch_found_by_the_checksum_pass_is_the_error_raised(tmp_path: Path) -> None:
    """The small tensors are checked from the mapping while the large ones are read; a
    mismatch there stops the reads, and it (not the stop) is what the restore raises."""
    prefix = _save(_state(0), tmp_path)
    flip_byte_of(prefix, "scalar")
    with pytest.raises(errors.DataLossError, match=r"scalar|checksummed together"):
        Saver(atomic_restore=False).restore(Session(_state(1)), prefix)


def test_an_error_noted_as_written_is_told_apart() -> None:
    from trainhooks.checkpoint.saving.restore import WRITTEN_NOTE, add_note, wrote_into_state

    error = OSError(5, "Input/output error")
    assert not wrote_into_state(error)
    add_note(error, WRITTEN_NOTE)
    assert wrote_into_state(error)
    assert not wrote_into_state(errors.DataLossError("corrupt"))
