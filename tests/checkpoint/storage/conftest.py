"""The S3 server fixtures (moto: ``tests/helpers/s3_server.py``; SeaweedFS:
``tests/helpers/seaweedfs.py``) for the storage tests."""

from tests.helpers.s3_server import s3_bucket, s3_endpoint
from tests.helpers.seaweedfs import (
    s3_store,
    seaweedfs_bucket,
    seaweedfs_endpoint,
    seaweedfs_storage,
)

__all__ = [
    "s3_bucket",
    "s3_endpoint",
    "s3_store",
    "seaweedfs_bucket",
    "seaweedfs_endpoint",
    "seaweedfs_storage",
]
