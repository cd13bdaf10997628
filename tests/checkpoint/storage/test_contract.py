"""The storage contract: what every ``Storage`` backend must guarantee, run against each.

Backends: the local disk (rename commit), the local disk publishing by writing the
manifest last (``LocalStorage(rename=False)``: the commit an object store needs, on
real files), the in-memory object store (``MemoryStorage``, ``memory://`` paths), and
S3 (``S3Storage``, ``s3://`` paths) on two real local S3 servers: moto
(``tests/helpers/s3_server.py``) and SeaweedFS (``tests/helpers/seaweedfs.py``).
A new backend is added to ``BACKENDS`` and must pass every test here unchanged.
"""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import pytest
from tests.helpers.checkpoints import Flat, td

import trainhooks as th
from trainhooks.checkpoint.format.opening import open_checkpoint
from trainhooks.checkpoint.saving.write import write_checkpoint, write_data_files
from trainhooks.checkpoint.storage import (
    LocalStorage,
    MemoryStorage,
    PreconditionFailed,
    Storage,
    storage_for,
)
from trainhooks.checkpoint.storage.commit import (
    MANIFEST_NAME,
    begin_staging,
    delete_checkpoint,
    is_checkpoint,
    remove_leftovers,
)


class Backend(NamedTuple):
    storage: Storage
    root: str  # an empty directory (prefix) on it


def _local(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    return Backend(LocalStorage(), str(tmp_path))


def _local_manifest_last(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    return Backend(LocalStorage(rename=False), str(tmp_path))


def _memory(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    # The one MemoryStorage that memory:// paths resolve to, so that path-based
    # functions (state file, readers) see the same objects; a fresh bucket per test.
    storage = storage_for("memory://x")
    assert isinstance(storage, MemoryStorage)
    return Backend(storage, f"memory://contract-{uuid.uuid4().hex}/run")


def _s3(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    # The S3Storage that s3:// paths resolve to (the test server's endpoint is in the
    # environment); a fresh bucket per test.
    bucket = request.getfixturevalue("s3_bucket")
    return Backend(storage_for(bucket), f"{bucket}/run")


def _s3_seaweedfs(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    # A second S3 server, SeaweedFS, reached through an S3Storage registered for the
    # test's bucket (explicit storage_options), so s3:// paths under it resolve there.
    bucket = request.getfixturevalue("seaweedfs_bucket")
    return Backend(storage_for(bucket), f"{bucket}/run")


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Any], Backend]] = {
    "local": _local,
    "local-manifest-last": _local_manifest_last,
    "memory": _memory,
    "s3": _s3,
    "s3-seaweedfs": _s3_seaweedfs,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture(params=["local", "memory", "s3", "s3-seaweedfs"])
def path_backend(request: pytest.FixtureRequest, tmp_path: Any) -> Backend:
    """Backends a plain path resolves to, for the public, path-based API."""
    return BACKENDS[request.param](request, tmp_path)


def _flat(seed: int, count: int = 3) -> tuple[Flat, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    arrays = {f"w{i}": rng.standard_normal(1000 + i).astype(np.float32) for i in range(count)}
    return Flat({k: td(v) for k, v in arrays.items()}, {k: k for k in arrays}), arrays


def _assert_holds(prefix: str, storage: Storage, arrays: dict[str, np.ndarray]) -> None:
    with open_checkpoint(prefix, storage=storage) as ckpt:
        ckpt.verify()
        for name, want in arrays.items():
            got = np.frombuffer(ckpt.tensor_data(name).buffer, np.float32)
            np.testing.assert_array_equal(got, want)


# -- small objects: atomic put, create-only, compare-and-swap ---------------------------


def test_put_replaces_a_small_object_and_reads_back(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    path = os.path.join(root, "checkpoint")
    assert storage.version(path) is None
    storage.put(path, b"first")
    v1 = storage.version(path)
    storage.put(path, b"second")
    assert storage.read_bytes(path, max_bytes=100) == b"second"
    assert storage.version(path) not in (None, v1)
    with pytest.raises(ValueError, match="larger than 3 bytes"):
        storage.read_bytes(path, max_bytes=3)


def test_create_only_put_refuses_an_existing_object(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    path = os.path.join(root, "lease")
    storage.put(path, b"mine", if_absent=True)
    with pytest.raises(FileExistsError):
        storage.put(path, b"theirs", if_absent=True)
    assert storage.read_bytes(path, max_bytes=100) == b"mine"


def test_compare_and_swap_put_refuses_a_stale_version(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    path = os.path.join(root, "checkpoint")
    storage.put(path, b"v1")
    seen = storage.version(path)
    assert seen is not None
    storage.put(path, b"v2 by another writer")
    with pytest.raises(PreconditionFailed):
        storage.put(path, b"v3 from a stale read", if_version=seen)
    assert storage.read_bytes(path, max_bytes=100) == b"v2 by another writer"
    storage.put(path, b"v3", if_version=storage.version(path))
    assert storage.read_bytes(path, max_bytes=100) == b"v3"


def test_files_written_then_read_by_range_and_view(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    path = os.path.join(root, "blob")
    data = bytes(range(256)) * 64
    f = storage.create(path)
    f.write([data[:1000], memoryview(data)[1000:]])
    f.fsync()
    f.close()
    assert storage.size(path) == len(data)
    r = storage.open_read(path)
    try:
        assert bytes(r.view()) == data
        buf = bytearray(100)
        assert r.readinto(500, memoryview(buf)) == 100
        assert bytes(buf) == data[500:600]
        assert r.readinto(len(data), memoryview(buf)) == 0
    finally:
        r.close()
    with pytest.raises(FileExistsError):
        storage.create(path)


def test_errors_name_the_path_and_keep_errno(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    missing = os.path.join(root, "nothing-here")
    with pytest.raises(FileNotFoundError) as info:
        storage.open_read(missing)
    assert info.value.errno == errno.ENOENT
    assert missing in str(info.value)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing, max_bytes=10)
    storage.delete(missing)  # a missing file is not an error
    storage.remove_tree(missing)


# -- checkpoints: publish, replace, delete, leftovers -----------------------------------


def test_a_checkpoint_round_trips_and_is_listed_only_once_committed(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    prefix = os.path.join(root, "model.ckpt-1")
    flat, arrays = _flat(1)
    assert not is_checkpoint(prefix, storage=storage)
    write_checkpoint(prefix, flat, global_step=1, storage=storage, max_shard_bytes=4096)
    assert is_checkpoint(prefix, storage=storage)
    assert MANIFEST_NAME in storage.list_dir(prefix)
    _assert_holds(prefix, storage, arrays)


def test_a_re_save_replaces_the_checkpoint_whole(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    prefix = os.path.join(root, "model.ckpt-5")
    write_checkpoint(prefix, _flat(1)[0], global_step=5, storage=storage, max_shard_bytes=4096)
    before = set(storage.list_dir(prefix))
    flat, arrays = _flat(2)
    write_checkpoint(prefix, flat, global_step=5, storage=storage, max_shard_bytes=4096)
    _assert_holds(prefix, storage, arrays)
    # Nothing of the replaced save is left: exactly one manifest's files remain.
    after = storage.list_dir(prefix)
    assert len(after) == len(before)
    assert remove_leftovers(root, storage=storage) == []


class _FailingWrites:
    """A backend whose ``fail_at``-th file write fails with ENOSPC (a full disk)."""

    def __init__(self, inner: Storage, fail_at: int) -> None:
        self._inner = inner
        self._left = fail_at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def create(self, path: str) -> Any:
        inner = self._inner.create(path)
        outer = self

        class File:
            def write(self, buffers: Sequence[memoryview | bytes]) -> None:
                outer._left -= 1
                if outer._left == 0:
                    raise OSError(errno.ENOSPC, "No space left on device", path)
                inner.write(buffers)

            def fsync(self) -> None:
                inner.fsync()

            def close(self) -> None:
                inner.close()

        return File()


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_a_failing_save_commits_nothing_and_keeps_the_previous_checkpoint(
    backend: Backend, fail_at: int
) -> None:
    storage, root = backend
    storage.makedirs(root)
    prefix = os.path.join(root, "model.ckpt-7")
    new = os.path.join(root, "model.ckpt-8")
    old_flat, old_arrays = _flat(1)
    write_checkpoint(prefix, old_flat, global_step=7, storage=storage, max_shard_bytes=4096)
    failing: Any = _FailingWrites(storage, fail_at)
    for target in (prefix, new):
        failing._left = fail_at
        with pytest.raises(OSError, match=r"saving checkpoint .* failed") as info:
            write_checkpoint(
                target, _flat(2)[0], global_step=7, storage=failing, max_shard_bytes=4096
            )
        assert info.value.errno == errno.ENOSPC
    _assert_holds(prefix, storage, old_arrays)
    assert not is_checkpoint(new, storage=storage)
    remove_leftovers(root, storage=storage)
    entries = [e for e in storage.list_dir(root)]
    assert os.path.basename(prefix) in entries
    assert all(".tmp-" not in e and ".old-" not in e for e in entries)


def test_a_crashed_save_is_never_listed_and_is_cleaned_at_the_next_start(
    backend: Backend,
) -> None:
    storage, root = backend
    storage.makedirs(root)
    prefix = os.path.join(root, "model.ckpt-3")
    flat, _ = _flat(3)
    # A save that wrote its data files and died before its commit.
    from trainhooks.checkpoint.format.flat_check import check_flat
    from trainhooks.checkpoint.saving.layout import plan_layout

    tensors = check_flat(flat, 3)
    layout = plan_layout(tensors, tensors, 4096, 1)
    staging = begin_staging(storage, prefix)
    write_data_files(storage, staging, tensors, layout, range(len(layout.groups)))
    assert not is_checkpoint(prefix, storage=storage)
    with pytest.raises(th.errors.NotFoundError if storage.can_rename else th.errors.DataLossError):
        open_checkpoint(prefix, storage=storage)
    removed = remove_leftovers(root, storage=storage)
    assert removed
    assert not storage.exists(prefix) or storage.list_dir(prefix) == []


def test_delete_uncommits_first_and_refuses_foreign_files(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    prefix = os.path.join(root, "model.ckpt-9")
    write_checkpoint(prefix, _flat(1)[0], global_step=9, storage=storage)
    delete_checkpoint(prefix, storage=storage)
    assert not is_checkpoint(prefix, storage=storage)
    assert not storage.exists(prefix)
    other = os.path.join(root, "notes")
    storage.makedirs(other)
    storage.put(os.path.join(other, "todo.txt"), b"keep me")
    with pytest.raises(ValueError, match="not part of a checkpoint"):
        delete_checkpoint(other, storage=storage)
    assert storage.read_bytes(os.path.join(other, "todo.txt"), max_bytes=100) == b"keep me"


# -- the public API on a path of each backend ---------------------------------------------


def _holding(storage: Storage, directory: str) -> list[str]:
    """The names ``list_dir`` lists that hold something (an object store may still list
    a prefix emptied a moment ago: SeaweedFS keeps its folder)."""
    names = []
    for name in storage.list_dir(directory):
        path = os.path.join(directory, name)
        if not storage.is_dir(path) or storage.list_dir(path):
            names.append(name)
    return names


@pytest.fixture
def saver_run(path_backend: Backend) -> Iterator[tuple[str, th.Saver]]:
    storage, root = path_backend
    storage.makedirs(root)
    saver = th.Saver(max_to_keep=2)
    yield root, saver
    saver.close()


def test_saver_retention_state_file_and_restore_on_each_backend(
    saver_run: tuple[str, th.Saver],
) -> None:
    root, saver = saver_run
    w = np.zeros(16, np.float32)
    session = th.Session({"w": w})
    for step in range(1, 5):
        w[:] = step
        session.global_step = step
        saver.save(session, os.path.join(root, "model.ckpt"), global_step=step)
    state = th.get_checkpoint_state(root)
    assert state is not None
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == [
        "model.ckpt-3",
        "model.ckpt-4",
    ]
    assert th.latest_checkpoint(root) == os.path.join(root, "model.ckpt-4")
    storage = storage_for(root)
    assert sorted(n for n in _holding(storage, root) if n.startswith("model.ckpt")) == [
        "model.ckpt-3",
        "model.ckpt-4",
    ]
    w[:] = -1
    assert saver.restore_latest(session, root) == os.path.join(root, "model.ckpt-4")
    np.testing.assert_array_equal(w, np.full(16, 4, np.float32))
    assert th.load_variable(root, "w").tolist() == [4.0] * 16


def test_an_unknown_scheme_is_an_error_not_a_local_directory(tmp_path: Any) -> None:
    os.chdir(tmp_path)
    with pytest.raises(ValueError, match="No storage for 'ftp://'"):
        th.Saver().save(th.Session({"w": np.zeros(2)}), "ftp://host/run/model.ckpt", 1)
    with pytest.raises(ValueError, match=r"No storage for 'gs://'.*not supported yet"):
        th.latest_checkpoint("gs://bucket/run")
    with pytest.raises(ValueError, match="No storage for 'az://'"):
        th.latest_checkpoint("az://container/run")
    assert os.listdir(tmp_path) == []


class _FailingDeletes:
    """A backend whose deletes fail (a transient error on a store)."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def delete(self, path: str) -> None:
        raise OSError(errno.EIO, "Input/output error", path)


def test_a_failure_after_the_commit_never_touches_the_committed_checkpoint(
    backend: Backend,
) -> None:
    storage, root = backend
    storage.makedirs(root)
    prefix = os.path.join(root, "model.ckpt-4")
    write_checkpoint(prefix, _flat(1)[0], global_step=4, storage=storage)
    flat, arrays = _flat(2)
    # The re-save commits; removing the replaced checkpoint's files then fails.
    failing: Any = _FailingDeletes(storage)
    write_checkpoint(prefix, flat, global_step=4, storage=failing)
    _assert_holds(prefix, storage, arrays)
    remove_leftovers(root, storage=storage)  # the next start removes what is unlisted
    _assert_holds(prefix, storage, arrays)


def test_two_saves_racing_on_one_prefix_commit_one_whole_checkpoint(backend: Backend) -> None:
    storage, root = backend
    if storage.can_rename:
        pytest.skip("the rename commit replaces a directory whole; no manifest to race on")
    storage.makedirs(root)
    prefix = os.path.join(root, "model.ckpt-6")
    write_checkpoint(prefix, _flat(1)[0], global_step=6, storage=storage)
    from trainhooks.checkpoint.format.flat_check import check_flat
    from trainhooks.checkpoint.format.manifest import Manifest
    from trainhooks.checkpoint.saving.layout import plan_layout
    from trainhooks.checkpoint.saving.write import commit_checkpoint

    staged = []
    for seed in (2, 3):  # two saves of the same step, begun before either commits
        flat, arrays = _flat(seed)
        tensors = check_flat(flat, 6)
        layout = plan_layout(tensors, tensors, 1 << 30, 1)
        staging = begin_staging(storage, prefix)
        files = write_data_files(storage, staging, tensors, layout, range(len(layout.groups)))
        staged.append((staging, Manifest(6, 0.0, flat.tree, {}, files, {}), arrays))
    first, second = staged
    commit_checkpoint(storage, first[0], first[1])
    with pytest.raises((PreconditionFailed, FileExistsError)):
        commit_checkpoint(storage, second[0], second[1])
    _assert_holds(prefix, storage, first[2])  # whole, with its data


def test_create_is_exclusive_while_a_file_is_being_written(backend: Backend) -> None:
    storage, root = backend
    storage.makedirs(root)
    path = os.path.join(root, "data")
    f = storage.create(path)
    try:
        with pytest.raises(FileExistsError):
            storage.create(path)
    finally:
        f.fsync()
        f.close()
