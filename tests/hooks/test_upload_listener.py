"""UploadListener: local checkpoints uploaded to a real S3 server in the background.

The server is moto's (``tests/helpers/s3_server.py``); faults come from the real
proxy of ``tests/helpers/fault_proxy.py``. Nothing is timed: a stalled store is a proxy
that holds every request until the test lets it go.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
from tests.helpers.fault_proxy import FaultProxy, Rule, nth
from tests.helpers.paths import PROGRAMS
from tests.helpers.s3_server import s3_bucket, s3_endpoint

import trainhooks as th
from trainhooks.checkpoint.management.state_file import CheckpointState
from trainhooks.checkpoint.storage.resolve import register_storage
from trainhooks.checkpoint.storage.s3 import S3Storage
from trainhooks.checkpoint.storage.s3_client import RetryPolicy
from trainhooks.hooks.listeners.remote_copy import HOLDING_DIR
from trainhooks.session.hooked import HookedSession
from trainhooks.session.session import Session

sys.path.insert(0, str(PROGRAMS))  # tests/_programs/*.py are imported by name

import crash_driver

__all__ = ["s3_bucket", "s3_endpoint"]


class _WaitForUpload(th.CheckpointSaverListener):
    """Listed after an UploadListener: makes each save wait for its upload (for exact lists)."""

    def __init__(self, upload: th.UploadListener) -> None:
        self.upload = upload

    def after_save(self, session: Session, global_step_value: int) -> None:
        assert self.upload.wait_for_uploads(timeout=120)


class _Run:
    """A hook saving every step of ``w += 1`` (float32, 1000 values) into ``local``."""

    def __init__(self, local: Path, listeners: list[th.CheckpointSaverListener], keep: int) -> None:
        self.hook = th.CheckpointSaverHook(
            str(local), save_steps=1, saver=th.Saver(max_to_keep=keep), listeners=listeners
        )
        self.hook.begin()
        self.sess = Session({"w": np.zeros(1000, np.float32)})
        self.mon = HookedSession(self.sess, [self.hook])
        self.hook.after_create_session(self.sess, th.Coordinator())  # saves step 0

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.mon.run(lambda: self.sess.state["w"].__iadd__(1.0))

    def end(self) -> None:
        self.hook.end(self.sess)


def _remote_names(endpoint: str, run: str) -> tuple[list[str], set[str]]:
    """Straight from the server, past any proxy: the state file's list and the prefixes
    holding a manifest."""
    bucket, _, prefix = run[len("s3://") :].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    keys = [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    ]
    committed = {k.split("/")[-2] for k in keys if k.endswith("/manifest.json")}
    if f"{prefix}/checkpoint" not in keys:
        return [], committed
    text = s3.get_object(Bucket=bucket, Key=f"{prefix}/checkpoint")["Body"].read()
    state = CheckpointState.from_text(text)
    return [os.path.basename(p) for p in state.all_model_checkpoint_paths], committed


def _objects_below(endpoint: str, prefix_url: str) -> list[str]:
    bucket, _, prefix = prefix_url[len("s3://") :].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    return [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    ]


def _restored_w(run: str) -> tuple[str | None, np.ndarray]:
    sess = Session({"w": np.full(1000, -1, np.float32)})
    prefix = th.Saver().restore_latest(sess, run)
    return prefix, sess.state["w"]


def _through(proxy: FaultProxy, read_timeout: float = 1) -> S3Storage:
    """S3 storage sending every request through ``proxy``, tried up to 5 times at most 0.05 s apart;
    an attempt with no answer within ``read_timeout`` seconds fails."""
    return S3Storage(
        {"endpoint_url": proxy.endpoint, "read_timeout": read_timeout, "connect_timeout": 1},
        retry=RetryPolicy(max_attempts=5, timeout=120, base_delay=0.01, max_delay=0.05),
    )


@pytest.fixture
def proxied(s3_endpoint: str, s3_bucket: str) -> Iterator[FaultProxy]:
    """Every request for ``s3_bucket`` goes through a fault proxy (no fault until told)."""
    proxy = FaultProxy(s3_endpoint)
    register_storage(s3_bucket, _through(proxy))
    yield proxy
    register_storage(s3_bucket, None)
    proxy.stop()


def test_each_checkpoint_is_uploaded_with_retention_on_both_sides(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    run = f"{s3_bucket}/run"
    upload = th.UploadListener(run, keep=3)
    train = _Run(tmp_path, [upload, _WaitForUpload(upload)], keep=2)
    train.steps(5)
    train.end()
    assert _remote_names(s3_endpoint, run) == (
        ["model.ckpt-3", "model.ckpt-4", "model.ckpt-5"],
        {"model.ckpt-3", "model.ckpt-4", "model.ckpt-5"},
    )
    assert sorted(p.name for p in tmp_path.glob("model.ckpt-*")) == ["model.ckpt-4", "model.ckpt-5"]
    assert not os.listdir(tmp_path / HOLDING_DIR)  # every hold given back
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-5"
    np.testing.assert_array_equal(th.load_variable(f"{run}/model.ckpt-4", "w"), np.full(1000, 4.0))
    # The copy is committed the way a save to S3 commits: data objects carry a token.
    names = [k.rsplit("/", 1)[1] for k in _objects_below(s3_endpoint, f"{run}/model.ckpt-5")]
    assert sorted(n.split(".")[0] for n in names) == ["data-00000-of-00001", "manifest"]
    assert all(n == "manifest.json" or n.count(".") == 2 for n in names)


def test_a_session_restores_from_the_uploaded_copy_after_end(
    s3_bucket: str, tmp_path: Path
) -> None:
    run = f"{s3_bucket}/run"
    state = {"w": np.zeros(1000, np.float32)}
    hook = th.CheckpointSaverHook(
        str(tmp_path / "local"), save_steps=2, listeners=[th.UploadListener(run)]
    )
    with th.MonitoredTrainingSession(
        state=state, hooks=[hook, th.StopAtStepHook(last_step=7)], save_summaries_steps=0
    ) as sess:
        while not sess.should_stop():
            sess.run(lambda: state["w"].__iadd__(0.5))
    # end() waited for the final checkpoint's upload
    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-7"
    fresh = {"w": np.zeros(1000, np.float32)}
    with th.MonitoredTrainingSession(
        state=fresh, checkpoint_dir=run, save_checkpoint_steps=None, save_summaries_steps=0
    ) as sess:
        assert sess.global_step == 7
    np.testing.assert_array_equal(fresh["w"], state["w"])


def test_training_goes_on_while_the_store_is_stalled(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, proxied: FaultProxy
) -> None:
    run = f"{s3_bucket}/run"
    # A held request waits for as long as the hold lasts, which is as long as the steps
    # below take: on a busy machine, more than 5 attempts of 1 s, after which step 1's
    # upload would fail instead of finishing from its hold.
    register_storage(s3_bucket, _through(proxied, read_timeout=120))
    stalled, arrived, gate = threading.Event(), threading.Event(), threading.Event()

    def hold_everything(method: str, path: str) -> str | None:
        if stalled.is_set():
            arrived.set()
            gate.wait(120)
        return None

    proxied.rule = hold_everything
    upload = th.UploadListener(run, keep=3)
    try:
        train = _Run(tmp_path, [upload], keep=2)
        assert upload.wait_for_uploads(timeout=120)  # step 0 is up; now the store stalls
        stalled.set()
        train.steps(1)
        assert arrived.wait(120)  # step 1's upload is stuck in the store
        train.steps(19)
        # Every step ran and was saved locally while no request could complete.
        assert train.sess.global_step == 20
        assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-20")
        assert not (tmp_path / "model.ckpt-1").exists()  # deleted locally by max_to_keep
        assert not upload.wait_for_uploads(timeout=0)
        assert _remote_names(s3_endpoint, run) == (["model.ckpt-0"], {"model.ckpt-0"})
    finally:
        stalled.clear()
        gate.set()
    train.end()
    # Step 1's upload finished from its hold; 2..19 were skipped for 20, the newest.
    assert _remote_names(s3_endpoint, run) == (
        ["model.ckpt-0", "model.ckpt-1", "model.ckpt-20"],
        {"model.ckpt-0", "model.ckpt-1", "model.ckpt-20"},
    )
    prefix, w = _restored_w(run)
    assert prefix == f"{run}/model.ckpt-20"
    np.testing.assert_array_equal(w, np.full(1000, 20.0))


def test_a_failed_upload_is_logged_never_listed_and_the_next_one_succeeds(
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
    proxied: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = f"{s3_bucket}/run"
    # Every attempt to commit step 2's copy is throttled, its data objects go through.
    proxied.rule = nth("PUT", "/run/model.ckpt-2/manifest.json", "slowdown", times=1000)
    upload = th.UploadListener(run, keep=None)
    with caplog.at_level(logging.ERROR, logger="trainhooks.hooks.listeners.upload"):
        train = _Run(tmp_path, [upload, _WaitForUpload(upload)], keep=5)
        train.steps(3)
        train.end()
    assert train.sess.global_step == 3
    assert any("Uploading model.ckpt-2 to" in r.getMessage() for r in caplog.records)
    assert _remote_names(s3_endpoint, run) == (
        ["model.ckpt-0", "model.ckpt-1", "model.ckpt-3"],
        {"model.ckpt-0", "model.ckpt-1", "model.ckpt-3"},
    )
    assert _objects_below(s3_endpoint, f"{run}/model.ckpt-2") == []  # its data removed too
    prefix, w = _restored_w(run)
    assert prefix == f"{run}/model.ckpt-3"
    np.testing.assert_array_equal(w, np.full(1000, 3.0))


def test_a_store_that_is_down_never_stops_training(
    s3_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
    proxied: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = f"{s3_bucket}/run"
    down: Rule = lambda method, path: "slowdown"  # noqa: E731
    proxied.rule = down
    upload = th.UploadListener(run, end_timeout=120)
    with caplog.at_level(logging.ERROR, logger="trainhooks.hooks.listeners.upload"):
        train = _Run(tmp_path, [upload], keep=5)
        train.steps(4)
        train.end()  # tries the last checkpoint once more, then gives up
    assert train.sess.global_step == 4
    assert th.latest_checkpoint(str(tmp_path)) == str(tmp_path / "model.ckpt-4")
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert failed and any("model.ckpt-4" in m for m in failed)
    assert _objects_below(s3_endpoint, run) == []
    assert not os.listdir(tmp_path / HOLDING_DIR)


def test_an_upload_listener_needs_a_hook() -> None:
    with pytest.raises(RuntimeError, match="not attached to a CheckpointSaverHook"):
        th.UploadListener("s3://bucket/run").begin()


@pytest.mark.slow
def test_sigkill_while_uploading_never_loses_a_committed_copy(
    s3_bucket: str, tmp_path: Path
) -> None:
    # A real training process saving every step locally and uploading each checkpoint in
    # the background, SIGKILLed at random moments: the uploaded copies stay whole and
    # restorable, and a last run leaves the store clean with its final checkpoint.
    result = crash_driver.upload_crash_loop(tmp_path / "ckpt", f"{s3_bucket}/run", 8, seed=21)
    assert result.kills == 8
    assert result.restores_checked >= 5, result.summary()
    assert len(set(result.steps_at_kill)) >= 3, result.steps_at_kill  # uploads went on
