"""Faults between trainhooks and S3: throttling, dropped connections, truncated and
stalled transfers, a store that keeps failing, and objects damaged at rest.

A real fault-injecting proxy (``tests/helpers/fault_proxy.py``) sits between the
client and a local S3 server (moto, and SeaweedFS); nothing committed may ever be
lost, and what a save reports must be what happened.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from tests.helpers.fault_proxy import FaultProxy, nth
from tests.helpers.seaweedfs import KEYS, S3Store

import trainhooks as th
from trainhooks.checkpoint.storage.resolve import register_storage
from trainhooks.checkpoint.storage.s3 import S3Storage
from trainhooks.checkpoint.storage.s3_client import RetryPolicy

_MIB = 1 << 20
_QUICK = RetryPolicy(max_attempts=6, timeout=30, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def proxy(s3_store: S3Store) -> Iterator[FaultProxy]:
    p = FaultProxy(s3_store.endpoint, stall_seconds=2.5)
    yield p
    p.stop()


def _through(proxy: FaultProxy, url: str, retry: RetryPolicy = _QUICK) -> S3Storage:
    """Make every path under ``url`` go through the proxy."""
    storage = S3Storage(
        {
            "endpoint_url": proxy.endpoint,
            "read_timeout": 1,
            "connect_timeout": 1,
            "region_name": "us-east-1",
            **KEYS,
        },
        part_bytes=5 * _MIB,
        range_bytes=2 * _MIB,
        retry=retry,
    )
    register_storage(url, storage)
    return storage


@pytest.fixture
def unregister(s3_store: S3Store) -> Iterator[None]:
    yield
    register_storage(s3_store.url, None)


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # 12 MiB: three upload parts of 5 MiB, six ranged reads of 2 MiB
    return {"big": rng.standard_normal(3 * _MIB, dtype=np.float32), "small": np.arange(10.0)}


def _save(run: str, step: int, seed: int) -> dict[str, np.ndarray]:
    state = _state(seed)
    saver = th.Saver()
    try:
        saver.save(th.Session(state), f"{run}/model.ckpt", global_step=step)
    finally:
        saver.close()
    return {k: v.copy() for k, v in state.items()}


def _restores(run: str, want: dict[str, np.ndarray]) -> str:
    state = {k: np.zeros_like(v) for k, v in want.items()}
    restored = th.Saver().restore_latest(th.Session(state), run)
    for k, v in want.items():
        np.testing.assert_array_equal(state[k], v)
    return restored


@pytest.mark.parametrize(
    ("method", "fragment", "fault"),
    [
        ("PUT", "partNumber=2", "slowdown"),  # throttled upload part
        ("POST", "uploads", "slowdown"),  # throttled CreateMultipartUpload
        ("PUT", "partNumber=1", "drop"),  # connection reset before the server saw it
        ("PUT", "partNumber=3", "drop_after"),  # applied, then the answer was lost
        ("PUT", "partNumber=2", "stall"),  # a stalled upload, past the read timeout
        ("POST", "uploadId=", "drop_after"),  # the completion applied, answer lost
        ("PUT", "manifest.json", "drop_after"),  # the commit applied, answer lost
        ("PUT", "manifest.json", "slowdown"),  # the commit throttled
        ("PUT", "/checkpoint", "drop_after"),  # the state file applied, answer lost
    ],
)
def test_a_save_through_transient_faults_commits_whole(
    proxy: FaultProxy, s3_store: S3Store, unregister: None, method: str, fragment: str, fault: str
) -> None:
    run = f"{s3_store.url}/run"
    _through(proxy, s3_store.url)
    proxy.rule = nth(method, fragment, fault, times=2)
    want = _save(run, 1, seed=1)
    met = [f for *_, f in proxy.seen if f]
    # A conditional write whose answer was lost is read back, and not sent again once
    # found applied; anything else is simply retried.
    conditional = fault == "drop_after" and fragment in (
        "uploadId=",
        "manifest.json",
        "/checkpoint",
    )
    assert met == ([fault] if conditional else [fault, fault]), met
    assert _restores(run, want) == f"{run}/model.ckpt-1"


@pytest.mark.parametrize("fault", ["truncate", "drop", "slowdown", "stall", "stall_body"])
def test_a_restore_through_faulty_ranged_reads_gets_every_byte(
    proxy: FaultProxy, s3_store: S3Store, unregister: None, fault: str
) -> None:
    run = f"{s3_store.url}/run"
    _through(proxy, s3_store.url)
    want = _save(run, 1, seed=2)
    proxy.rule = nth("GET", "safetensors", fault, times=2, skip=1)
    assert _restores(run, want) == f"{run}/model.ckpt-1"
    assert sum(1 for *_, f in proxy.seen if f == fault) == 2


def test_a_store_that_keeps_failing_fails_the_save_and_keeps_every_committed_one(
    proxy: FaultProxy, s3_store: S3Store, unregister: None
) -> None:
    run = f"{s3_store.url}/run"
    _through(proxy, s3_store.url, RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02))
    want = _save(run, 1, seed=3)
    proxy.rule = lambda method, path: "slowdown" if "partNumber=2" in path else None
    with pytest.raises(OSError, match="UploadPart failed after 3 attempts") as info:
        _save(run, 2, seed=4)
    assert "SlowDown" in str(info.value)
    proxy.rule = lambda method, path: None
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-1"
    assert _restores(run, want) == f"{run}/model.ckpt-1"
    client = s3_store.client()
    bucket, prefix = s3_store.split()
    uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    assert uploads.get("Uploads", []) == []
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    assert not [k for k in keys if k.startswith(f"{prefix}run/model.ckpt-2/")]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_object_is_detected_and_the_previous_checkpoint_restored(
    s3_store: S3Store, damage: str
) -> None:
    run = f"{s3_store.url}/run"
    older = _save(run, 1, seed=5)
    _save(run, 2, seed=6)
    client = s3_store.client()
    bucket, prefix = s3_store.split()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}run/model.ckpt-2/data-")
    key = listing["Contents"][0]["Key"]
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        del data[len(data) - 100 :]
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))  # bit rot at rest
    with (
        pytest.raises(th.errors.DataLossError, match=r"model\.ckpt-2"),
        th.load_checkpoint(f"{run}/model.ckpt-2") as reader,
    ):
        reader.get_tensor("big")
    assert _restores(run, older) == f"{run}/model.ckpt-1"
