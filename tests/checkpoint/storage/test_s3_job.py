"""A torch.distributed (gloo) job of two real processes saving to S3: one commit per save.

Both ranks run ``tests/_programs/dist_train.py`` with ``--checkpoint-dir s3://...``; the
local S3 server is reached from the subprocesses through the standard variables
(``AWS_ENDPOINT_URL`` and the keys the suite sets), here pointed at a proxy in this
process that records every request, so the test can count the commits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.jobs import run_job
from tests.helpers.paths import PROGRAMS

import trainhooks as th
from trainhooks.checkpoint.storage.resolve import s3_default
from trainhooks.cli import main

pytest.importorskip("torch")
pytestmark = pytest.mark.slow  # two torch processes per job

PROGRAM = PROGRAMS / "dist_train.py"


@pytest.fixture
def recorded(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """A proxy without faults in front of the server; the jobs' processes go through it."""
    proxy = FaultProxy(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    s3_default.cache_clear()
    yield proxy
    monkeypatch.undo()
    s3_default.cache_clear()
    proxy.stop()


def job(directory: Path, *args: str) -> list[dict[str, Any]]:
    directory.mkdir(parents=True, exist_ok=True)
    results = run_job(PROGRAM, directory, 2, *args)
    for r in results:
        assert "error" not in r and "digest" in r, (r.get("traceback"), r["stderr"])
    return results


def test_a_two_rank_job_saves_to_s3_with_one_commit_and_a_fresh_job_restores_it(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, recorded: FaultProxy
) -> None:
    run = f"{s3_bucket}/run"
    bucket = s3_bucket[len("s3://") :]
    args = ("--steps", "8", "--save-every", "4", "--checkpoint-dir", run)
    first = job(tmp_path / "first", *args)
    assert [(r["restored"], r["end"]) for r in first] == [(None, 8), (None, 8)]
    assert first[0]["digest"] == first[1]["digest"]  # DDP keeps the replicas equal

    # One commit per save: one manifest put each, nothing else ever wrote a manifest.
    manifest_puts = [
        path.split("?")[0]
        for method, path, _ in recorded.seen
        if method == "PUT" and path.split("?")[0].endswith("/manifest.json")
    ]
    assert sorted(manifest_puts) == [
        f"/{bucket}/run/model.ckpt-4/manifest.json",
        f"/{bucket}/run/model.ckpt-8/manifest.json",
    ]
    # Every rank wrote its own data file, beside the one manifest.
    keys = [
        o["Key"].rsplit("/", 1)[1]
        for o in boto3.client("s3", endpoint_url=s3_endpoint)
        .list_objects_v2(Bucket=bucket, Prefix="run/model.ckpt-8/")
        .get("Contents", [])
    ]
    assert sorted(k.split(".")[0] for k in keys) == [
        "data-00000-of-00002",
        "data-00001-of-00002",
        "manifest",
    ]

    assert th.latest_checkpoint(run) == f"{run}/model.ckpt-8"
    assert main(["verify", run]) == 0

    fresh = job(tmp_path / "fresh", *args)  # restores step 8, trains no further
    assert [(r["restored"], r["start"], r["end"]) for r in fresh] == [
        (f"{run}/model.ckpt-8", 8, 8)
    ] * 2
    assert [r["digest"] for r in fresh] == [r["digest"] for r in first]
