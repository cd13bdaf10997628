"""The S3 client behind ``S3Storage``: configuration, retries, and errors as ``OSError``.

Configuration is what every S3 user already has: botocore reads the standard
environment variables and files (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``, ``AWS_PROFILE``, ``~/.aws/config`` and ``~/.aws/credentials``);
an endpoint that says ``http://`` is spoken to in plain HTTP. ``storage_options``
overrides any of it for one storage (:data:`STORAGE_OPTIONS` lists the keys).

Retries are ours, not botocore's (its own are switched off), because only the caller
knows whether a failed request may simply be sent again. :meth:`S3Client.call` retries
throttling (``SlowDown``, 503, 429), server errors and dropped connections with full
jitter exponential backoff, bounded by a number of attempts and a time budget. A
request whose outcome is unknown (the connection dropped after the request was sent)
is retried only after its ``landed`` check (a read-back) says it did not take effect:
a conditional put that landed and is sent again would fail its own precondition.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

try:
    import boto3
    import botocore.config
    import botocore.exceptions
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "s3:// checkpoints need the S3 client (boto3): pip install 'trainhooks[s3]'"
    ) from e

from trainhooks.checkpoint.storage.base import PreconditionFailed

__all__ = ["STORAGE_OPTIONS", "RetryPolicy", "S3Client"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The keys ``storage_options`` may set, and what each is passed to.
STORAGE_OPTIONS = {
    "endpoint_url": "the S3 endpoint, e.g. http://127.0.0.1:9000 (default: AWS_ENDPOINT_URL, or AWS)",
    "region_name": "the region (default: AWS_REGION / AWS_DEFAULT_REGION / the profile's)",
    "profile_name": "a profile of ~/.aws/config (default: AWS_PROFILE, or 'default')",
    "aws_access_key_id": "the access key (default: the environment, the profile, the instance role)",
    "aws_secret_access_key": "the secret key",
    "aws_session_token": "a session token for temporary credentials",
    "verify": "False to skip TLS certificate checks, or a CA bundle path",
    "connect_timeout": "seconds to wait for a connection (default 10)",
    "read_timeout": "seconds to wait for a response or the next bytes of one (default 60)",
    "max_pool_connections": "connections kept open (default 32)",
}
_SESSION_KEYS = (
    "region_name",
    "profile_name",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
)

# Error codes a request may meet on a healthy store and should be sent again for.
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "RequestLimitExceeded",
        "ConditionalRequestConflict",  # 409: a concurrent conditional write, "retry"
        "OperationAborted",
    }
)
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# The request never reached the server: sending it again cannot apply it twice.
_NOT_SENT = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)
# The connection failed somewhere between sending and receiving all of the response.
_DROPPED = (
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
)


class RetryPolicy:
    """How long and how often :meth:`S3Client.call` retries a request.

    Attributes:
      max_attempts: attempts per request, the first included.
      timeout: seconds after the first attempt past which no retry starts.
      base_delay: the first backoff's upper bound, in seconds; it doubles per retry...
      max_delay: ...up to this many seconds. Each sleep is uniform in [0, bound] (full jitter).

    Example:
        >>> RetryPolicy(max_attempts=3).delay(10) <= RetryPolicy().max_delay
        True
    """

    def __init__(
        self,
        *,
        max_attempts: int = 10,
        timeout: float = 180.0,
        base_delay: float = 0.1,
        max_delay: float = 10.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.base_delay = base_delay
        self.max_delay = max_delay

    def delay(self, retry: int) -> float:
        """The sleep before retry number ``retry`` (0-based): full jitter backoff."""
        return random.uniform(0.0, min(self.max_delay, self.base_delay * 2.0**retry))


def error_code(e: BaseException) -> tuple[str, int]:
    """The S3 error code and HTTP status of a botocore ``ClientError`` ("", 0 if not one)."""
    if not isinstance(e, botocore.exceptions.ClientError):
        return "", 0
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def as_os_error(e: BaseException, path: str, *, conditional: str = "") -> OSError:
    """``e`` as the ``OSError`` the ``Storage`` contract promises, naming ``path``.

    ``conditional``: "absent" or "version" when the request was a conditional put, so a
    412 becomes ``FileExistsError`` or :class:`PreconditionFailed`.
    """
    code, status = error_code(e)
    message = str(e)
    if conditional == "absent" and status == 412:
        return FileExistsError(errno.EEXIST, "object exists", path)
    if conditional == "version" and status in (404, 412):
        return PreconditionFailed(errno.EAGAIN, "changed since the version read", path)
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchUpload"):
        return FileNotFoundError(errno.ENOENT, f"{code or 'not found'}: {message}", path)
    if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return PermissionError(errno.EACCES, f"{code or 'access denied'}: {message}", path)
    if status == 412:
        return PreconditionFailed(errno.EAGAIN, message, path)
    if isinstance(
        e, botocore.exceptions.ReadTimeoutError | botocore.exceptions.ConnectTimeoutError
    ):
        return TimeoutError(errno.ETIMEDOUT, message, path)
    return OSError(errno.EIO, message, path)


class S3Client:
    """One botocore S3 client, configured once, with retries that the caller controls.

    Args:
      storage_options: overrides of the standard AWS configuration (:data:`STORAGE_OPTIONS`).
      retry: the retry policy of every request.

    Example:
        >>> client = S3Client({"endpoint_url": "http://127.0.0.1:9000"})  # doctest: +SKIP
    """

    def __init__(
        self, storage_options: Mapping[str, Any] | None = None, retry: RetryPolicy | None = None
    ) -> None:
        options = dict(storage_options or {})
        unknown = sorted(set(options) - set(STORAGE_OPTIONS))
        if unknown:
            raise ValueError(
                f"Unknown storage_options {unknown}; the S3 storage takes: "
                + ", ".join(sorted(STORAGE_OPTIONS))
            )
        self.retry = retry or RetryPolicy()
        session = boto3.session.Session(**{k: options[k] for k in _SESSION_KEYS if k in options})
        config = botocore.config.Config(
            connect_timeout=options.get("connect_timeout", 10),
            read_timeout=options.get("read_timeout", 60),
            max_pool_connections=options.get("max_pool_connections", 32),
            retries={"total_max_attempts": 1},  # ours: see call()
        )
        client_options = {k: options[k] for k in ("endpoint_url", "verify") if k in options}
        self.s3: Any = session.client("s3", config=config, **client_options)

    def call(
        self,
        what: str,
        path: str,
        request: Callable[[], T],
        *,
        landed: Callable[[], bool] | None = None,
        conditional: str = "",
    ) -> T | None:
        """Run ``request`` until it succeeds, retrying what a healthy store may answer.

        Args:
          what: the operation, for log lines ("PutObject").
          path: the object's URL, for errors.
          request: sends the request; its result is returned.
          landed: for a request that must not be applied twice, a read-back that says
            whether an attempt whose outcome is unknown took effect; then ``call``
            returns None instead of sending it again.
          conditional: see :func:`as_os_error`.

        Raises:
          OSError: the request failed for good (or ran out of attempts or time).
        """
        policy = self.retry
        deadline = time.monotonic() + policy.timeout
        unknown = False  # an earlier attempt may have landed
        for attempt in range(policy.max_attempts):
            try:
                return request()
            except botocore.exceptions.ClientError as e:
                code, status = error_code(e)
                if landed is not None and unknown and status == 412 and landed():
                    return None  # our own earlier attempt made the precondition fail
                if code not in _RETRY_CODES and status not in _RETRY_STATUS:
                    raise as_os_error(e, path, conditional=conditional) from e
                failure: BaseException = e
            except _NOT_SENT as e:
                failure = e
            except _DROPPED as e:
                if landed is not None:
                    unknown = True
                    if landed():
                        return None
                failure = e
            if attempt + 1 == policy.max_attempts or time.monotonic() >= deadline:
                break
            pause = min(policy.delay(attempt), max(0.0, deadline - time.monotonic()))
            logger.info("S3 %s %s failed (%s); retrying in %.2f s.", what, path, failure, pause)
            time.sleep(pause)
        raise _gave_up(what, path, failure, attempt + 1, policy)


def _gave_up(what: str, path: str, e: BaseException, attempts: int, policy: RetryPolicy) -> OSError:
    error = as_os_error(e, path)
    error.strerror = (
        f"{what} failed after {attempts} attempts within {policy.timeout:.0f} s: {error.strerror}"
    )
    error.__cause__ = e
    return error
