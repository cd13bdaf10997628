"""A real S3 server for the tests: moto's ``ThreadedMotoServer`` on 127.0.0.1.

The suite starts one per test process (so each pytest-xdist worker has its own, on a
port the kernel picks) and points the standard AWS variables at it, so that ``s3://``
paths resolve to it exactly as they would to a user's store. Each test gets a fresh
bucket. No client is mocked: every request is HTTP to the server.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

# The variables the server's clients read; any a developer has set are put back after.
_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3")


def start_moto() -> tuple[Any, str]:
    """Start a moto server on a free loopback port; returns it and its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def s3_environment(endpoint: str) -> dict[str, str]:
    """The environment a process needs to use the server at ``endpoint``."""
    return {**_ENV, "AWS_ENDPOINT_URL": endpoint}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of this test process's S3 server, set as ``AWS_ENDPOINT_URL``."""
    from trainhooks.checkpoint.storage.resolve import s3_default

    server, endpoint = start_moto()
    saved = {k: os.environ.get(k) for k in (*_ENV, "AWS_ENDPOINT_URL", *_UNSET)}
    for k in _UNSET:
        os.environ.pop(k, None)
    os.environ.update(s3_environment(endpoint))
    s3_default.cache_clear()
    try:
        yield endpoint
    finally:
        s3_default.cache_clear()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def make_bucket(endpoint: str) -> str:
    """Create a new bucket on the server; returns its ``s3://`` URL."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:20]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket for one test: ``s3://test-...``."""
    return make_bucket(s3_endpoint)
