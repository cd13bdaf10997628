"""The S3 server fixtures (``tests/helpers/s3_server.py``) for the storage tests."""

from tests.helpers.s3_server import s3_bucket, s3_endpoint

__all__ = ["s3_bucket", "s3_endpoint"]
