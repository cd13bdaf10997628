"""``S3Storage`` beyond the shared contract: configuration, the writer lease, leftovers.

Against a real S3 server (moto's, on 127.0.0.1, started by ``tests/helpers/s3_server.py``);
the contract every backend passes is in ``test_contract.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest

import trainhooks as th
from trainhooks.checkpoint.storage import storage_for
from trainhooks.checkpoint.storage.commit import remove_leftovers
from trainhooks.checkpoint.storage.lock import LOCK_FILE_NAME, CheckpointDirLockedError
from trainhooks.checkpoint.storage.resolve import register_storage
from trainhooks.checkpoint.storage.s3 import S3Storage

_MIB = 1 << 20


def _objects(bucket_url: str, endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = bucket_url[len("s3://") :]
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", ()))


def _uploads(bucket_url: str, endpoint: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = bucket_url[len("s3://") :]
    return sorted(u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", ()))


# -- configuration ---------------------------------------------------------------------


def test_storage_options_override_the_environment_and_unknown_keys_are_refused(
    s3_endpoint: str, s3_bucket: str
) -> None:
    with pytest.raises(ValueError, match=r"Unknown storage_options \['endpoint'\].*endpoint_url"):
        S3Storage({"endpoint": s3_endpoint})
    storage = S3Storage({"endpoint_url": s3_endpoint, "region_name": "eu-west-1"})
    assert storage.client.s3.meta.endpoint_url == s3_endpoint
    assert storage.client.s3.meta.region_name == "eu-west-1"
    storage.put(f"{s3_bucket}/x", b"through the explicit endpoint")
    assert storage_for(s3_bucket).read_bytes(f"{s3_bucket}/x", max_bytes=100) == (
        b"through the explicit endpoint"
    )


def test_a_registered_storage_serves_its_prefix(s3_endpoint: str, s3_bucket: str) -> None:
    mine = S3Storage({"endpoint_url": s3_endpoint})
    register_storage(f"{s3_bucket}/mine", mine)
    try:
        assert storage_for(f"{s3_bucket}/mine/run") is mine
        assert storage_for(f"{s3_bucket}/other") is not mine
        assert storage_for(f"{s3_bucket}/mine-too") is not mine
    finally:
        register_storage(f"{s3_bucket}/mine", None)
    assert storage_for(f"{s3_bucket}/mine/run") is not mine


def test_the_endpoint_and_keys_come_from_the_aws_profile_files(
    s3_endpoint: str, s3_bucket: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = os.path.join(str(tmp_path), "config")
    with open(config, "w") as f:
        f.write(
            f"[profile trainer]\nregion = us-east-1\nendpoint_url = {s3_endpoint}\n"
            "aws_access_key_id = fromprofile\naws_secret_access_key = fromprofile\n"
        )
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", config)
    monkeypatch.setenv("AWS_PROFILE", "trainer")
    storage = S3Storage()
    assert storage.client.s3.meta.endpoint_url == s3_endpoint
    storage.put(f"{s3_bucket}/from-profile", b"ok")
    assert storage.read_bytes(f"{s3_bucket}/from-profile", max_bytes=10) == b"ok"


def test_without_the_s3_extra_the_error_says_what_to_install() -> None:
    program = (
        "import sys; sys.modules['boto3'] = None\n"
        "from trainhooks.checkpoint.storage import storage_for\n"
        "try:\n"
        "    storage_for('s3://bucket/run')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=True
    ).stdout
    assert "pip install 'trainhooks[s3]'" in out


# -- the writer lease ------------------------------------------------------------------


def test_a_second_writer_gets_the_clear_error_until_the_first_releases(
    s3_endpoint: str, s3_bucket: str
) -> None:
    run = f"{s3_bucket}/run"
    first, second = S3Storage(), S3Storage()  # two processes' storages
    lease = first.lease(run)
    shared = first.lease(run)  # the same process: shared, as the local lock is
    with pytest.raises(CheckpointDirLockedError, match=r"locked for writing by process \d+") as e:
        second.lease(run)
    assert e.value.holder_pid == os.getpid()
    assert e.value.directory == run
    shared.release()
    with pytest.raises(CheckpointDirLockedError):
        second.lease(run)  # still held by the first handle
    lease.release()
    assert lease.released
    assert f"run/{LOCK_FILE_NAME}" not in _objects(s3_bucket, s3_endpoint)
    second.lease(run).release()


def test_a_lease_left_by_a_dead_process_or_expired_is_taken_over(s3_bucket: str) -> None:
    run = f"{s3_bucket}/run"
    storage = S3Storage()
    lock = f"{run}/{LOCK_FILE_NAME}"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    holder = {"owner": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "seconds": 3600}
    storage.put(lock, json.dumps(holder).encode())
    storage.lease(run).release()  # its holder is gone: taken over at once
    elsewhere = {"owner": "y", "host": "another-host", "pid": 1, "seconds": 3600}
    storage.put(lock, json.dumps(elsewhere).encode())
    with pytest.raises(CheckpointDirLockedError, match="process 1 on another-host"):
        storage.lease(run)
    expired = {**elsewhere, "seconds": -1}  # by the store's clock, it ran out already
    storage.put(lock, json.dumps(expired).encode())
    storage.lease(run).release()


def test_two_savers_in_two_processes_never_save_into_one_prefix(s3_bucket: str) -> None:
    run = f"{s3_bucket}/run"
    saver = th.Saver()
    saver.save(th.Session({"w": np.zeros(4)}), f"{run}/model.ckpt", global_step=1)
    other = (
        "import sys, numpy as np, trainhooks as th\n"
        "from trainhooks.checkpoint.storage.lock import CheckpointDirLockedError\n"
        "try:\n"
        "    th.Saver().save(th.Session({'w': np.ones(4)}), sys.argv[1], global_step=2)\n"
        "except CheckpointDirLockedError as e:\n"
        "    print('locked:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", other, f"{run}/model.ckpt"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    ).stdout
    assert out.startswith(f"locked: Checkpoint directory {run} is locked for writing by process")
    saver.close()
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-1"


_STALLING_SAVER = """
import sys, numpy as np, trainhooks as th
from trainhooks.checkpoint.storage import register_storage
from trainhooks.checkpoint.storage.lock import CheckpointDirLockedError
from trainhooks.checkpoint.storage.s3 import S3Storage
run = sys.argv[1]
register_storage(run, S3Storage(lease_seconds=2))
saver = th.Saver()
saver.save(th.Session({"w": np.zeros(4)}), run + "/model.ckpt", global_step=1)
print("saved 1", flush=True)
sys.stdin.readline()  # stopped (SIGSTOP) around here, resumed, then told to go on
try:
    saver.save(th.Session({"w": np.ones(4)}), run + "/model.ckpt", global_step=2)
    print("saved 2", flush=True)
except CheckpointDirLockedError as e:
    print("locked:", e, flush=True)
"""


@pytest.mark.slow
def test_a_writer_that_stalled_past_its_lease_commits_nothing_after_the_takeover(
    s3_bucket: str,
) -> None:
    # A real stall: the first writer's process is stopped with SIGSTOP for longer than
    # its 2 s lease, a second writer takes the directory over and saves, and the first
    # is resumed in the middle of its work. Its next save must not commit.
    run = f"{s3_bucket}/run"
    first = subprocess.Popen(
        [sys.executable, "-c", _STALLING_SAVER, run],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert first.stdin is not None and first.stdout is not None
    try:
        assert first.stdout.readline() == "saved 1\n"
        os.kill(first.pid, signal.SIGSTOP)
        time.sleep(4.5)  # past the 2 s lease by the store's clock (whole seconds)
        second = th.Saver()
        second.save(th.Session({"w": np.full(4, 5.0)}), f"{run}/model.ckpt", global_step=5)
        os.kill(first.pid, signal.SIGCONT)
        out, _ = first.communicate("go on\n", timeout=60)
    finally:
        first.kill()
    assert out.startswith(f"locked: Lost the writer lease of checkpoint directory {run}"), out
    assert f"process {os.getpid()}" in out  # the new holder is named
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-5"
    assert not storage_for(run).exists(f"{run}/model.ckpt-2/manifest.json")
    second.save(th.Session({"w": np.full(4, 6.0)}), f"{run}/model.ckpt", global_step=6)
    second.close()
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-6"


# -- leftovers of crashed saves ----------------------------------------------------------


def test_unfinished_uploads_of_a_crashed_save_are_aborted_at_the_next_start(
    s3_endpoint: str, s3_bucket: str
) -> None:
    run = f"{s3_bucket}/run"
    storage = S3Storage(part_bytes=5 * _MIB)
    crashed = storage.create(f"{run}/model.ckpt-3/data-00000-of-00001.0123456789ab.safetensors")
    crashed.write([bytes(6 * _MIB)])  # one part uploaded; the process then "dies"
    foreign = storage.create(f"{run}/notes/big.bin")  # not a checkpoint file: not ours
    foreign.write([bytes(6 * _MIB)])
    assert len(_uploads(s3_bucket, s3_endpoint)) == 2
    removed = remove_leftovers(run, storage=storage)
    assert removed == [f"{run}/model.ckpt-3/data-00000-of-00001.0123456789ab.safetensors"]
    assert _uploads(s3_bucket, s3_endpoint) == ["run/notes/big.bin"]


def test_a_closed_unfinished_upload_is_aborted_and_never_visible(
    s3_endpoint: str, s3_bucket: str
) -> None:
    storage = S3Storage(part_bytes=5 * _MIB)
    path = f"{s3_bucket}/run/big"
    f = storage.create(path)
    f.write([bytes(11 * _MIB)])
    f.close()  # no fsync: a failed save
    assert _uploads(s3_bucket, s3_endpoint) == []
    assert not storage.exists(path)


def test_a_multipart_file_round_trips_by_ranges(s3_bucket: str) -> None:
    storage = S3Storage(part_bytes=5 * _MIB, range_bytes=3 * _MIB)
    path = f"{s3_bucket}/run/big"
    data = np.random.default_rng(0).integers(0, 255, 13 * _MIB + 7, np.uint8).tobytes()
    f = storage.create(path)
    f.write([data[:100], memoryview(data)[100:]])
    f.fsync()
    f.close()
    r = storage.open_read(path)
    buf = bytearray(10)
    assert r.readinto(6 * _MIB - 5, memoryview(buf)) == 10
    assert bytes(buf) == data[6 * _MIB - 5 : 6 * _MIB + 5]
    assert bytes(r.view()) == data
    r.close()
