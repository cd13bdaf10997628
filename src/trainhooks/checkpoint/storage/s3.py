"""``S3Storage``: checkpoints on S3 and S3-compatible object stores (``s3://bucket/prefix``).

There is no rename on an object store, so checkpoints are published by writing the
manifest last (``commit.py``): data objects are written once, under names that carry
their save's token, and the manifest is put last with a create-only condition
(``If-None-Match: *``) or a compare-and-swap against the manifest it replaces
(``If-Match: <ETag>``). A "directory" is a key prefix; none is ever created as an
object (an empty prefix made by ``makedirs`` exists for this process only, as a
reminder that it was made). Versions are ETags.

Every request goes through :class:`~trainhooks.checkpoint.storage.s3_client.S3Client`
(configuration, retries, errors as ``OSError``); files are
:class:`~trainhooks.checkpoint.storage.s3_files.S3Writer` (parallel multipart
uploads) and :class:`~trainhooks.checkpoint.storage.s3_files.S3ReadFile` (parallel
ranged reads); the writer lock is a lease object
(:class:`~trainhooks.checkpoint.storage.s3_lease.LeaseObject`).
``docs/object_storage.md`` describes the whole protocol.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from trainhooks.checkpoint.storage.base import PreconditionFailed
from trainhooks.checkpoint.storage.s3_client import RetryPolicy, S3Client
from trainhooks.checkpoint.storage.s3_files import S3ReadFile, S3Writer
from trainhooks.checkpoint.storage.s3_lease import DEFAULT_LEASE_SECONDS, LeaseObject, server_time

__all__ = ["S3Storage"]

_MIB = 1 << 20
_MANIFEST = "manifest.json"  # commit.MANIFEST_NAME; commit.py imports this module's users


class S3Storage:
    """Checkpoint directories under ``s3://bucket/prefix`` on S3 or an S3-compatible store.

    Args:
      storage_options: overrides of the standard AWS configuration (``endpoint_url``,
        ``region_name``, ``profile_name``, keys, timeouts: ``s3_client.STORAGE_OPTIONS``).
      part_bytes: the size of an upload's parts (S3 takes 5 MiB to 5 GiB).
      max_in_flight: parts of one file uploading at once (the memory a file's upload needs).
      range_bytes: the size of a download's ranged reads.
      threads: the connections used for uploads, and as many for downloads.
      retry: retries of every request (default: 10 attempts within 180 s).
      lease_seconds: the writer lease's time to live.

    Example:
        >>> storage = S3Storage({"endpoint_url": "http://127.0.0.1:9000"})  # doctest: +SKIP
        >>> saver.save(sess, "s3://bucket/run/model.ckpt", global_step=1)  # doctest: +SKIP
    """

    can_rename = False

    def __init__(
        self,
        storage_options: Mapping[str, Any] | None = None,
        *,
        part_bytes: int = 16 * _MIB,
        max_in_flight: int = 8,
        range_bytes: int = 16 * _MIB,
        threads: int = 16,
        retry: RetryPolicy | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        if part_bytes < 5 * _MIB:
            raise ValueError(f"part_bytes must be at least 5 MiB (S3's minimum), got {part_bytes}")
        options = dict(storage_options or {})
        options.setdefault("max_pool_connections", 2 * threads + 4)
        self.client = S3Client(options, retry)
        self._part_bytes = part_bytes
        self._max_in_flight = max_in_flight
        self._range_bytes = range_bytes
        self._lease_seconds = lease_seconds
        self._uploads = ThreadPoolExecutor(threads, thread_name_prefix="trainhooks-s3-put")
        self._downloads = ThreadPoolExecutor(threads, thread_name_prefix="trainhooks-s3-get")
        self._made: set[str] = set()  # prefixes made by makedirs in this process
        self._leases: dict[str, tuple[LeaseObject, int]] = {}
        self._creating: set[str] = set()  # objects being written by this process
        self._buckets: set[str] = set()  # buckets seen to exist
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Storage(endpoint={self.client.s3.meta.endpoint_url!r})"

    # -- paths -----------------------------------------------------------------------

    @staticmethod
    def _split(path: str) -> tuple[str, str]:
        if not path.startswith("s3://"):
            raise ValueError(f"{path!r} is not an s3:// path")
        bucket, _, key = path[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{path!r} names no bucket; write s3://bucket/prefix")
        return bucket, key.strip("/")

    def _call(self, what: str, path: str, request: Callable[[], Any], **kw: Any) -> Any:
        return self.client.call(what, path, request, **kw)

    def _head(self, path: str) -> dict[str, Any] | None:
        bucket, key = self._split(path)
        if not key:
            return None
        try:
            return self._call(
                "HeadObject", path, lambda: self.client.s3.head_object(Bucket=bucket, Key=key)
            )
        except FileNotFoundError:
            return None

    def _list(self, path: str, *, delimiter: bool, limit: int = 0) -> Iterator[dict[str, Any]]:
        """The pages of a listing of the objects (and, with ``delimiter``, sub-prefixes) below ``path``."""
        bucket, key = self._split(path)
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{key}/" if key else ""}
        if delimiter:
            args["Delimiter"] = "/"
        if limit:
            args["MaxKeys"] = limit
        while True:
            page = self._call(
                "ListObjectsV2", path, functools.partial(self.client.s3.list_objects_v2, **args)
            )
            yield page
            if limit or not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def _has_children(self, path: str) -> bool:
        page = next(self._list(path, delimiter=False, limit=1))
        return bool(page.get("Contents"))

    def _made_here(self, path: str) -> bool:
        return path.rstrip("/") in self._made

    # -- directories -----------------------------------------------------------------

    def exists(self, path: str) -> bool:
        if not self._split(path)[1] or self._made_here(path):
            return True
        return self._head(path) is not None or self._has_children(path)

    def is_dir(self, path: str) -> bool:
        # Any prefix of an existing bucket that is not an object is a directory: a store
        # has no directories to create, and a save into a new prefix must not need one.
        if self._made_here(path) or self._has_children(path):
            return True
        return self._bucket_exists(path) and (not self._split(path)[1] or self._head(path) is None)

    def _bucket_exists(self, path: str) -> bool:
        bucket = self._split(path)[0]
        if bucket in self._buckets:
            return True
        try:
            self._call("HeadBucket", path, lambda: self.client.s3.head_bucket(Bucket=bucket))
        except FileNotFoundError:
            return False
        self._buckets.add(bucket)
        return True

    def mkdir(self, path: str) -> None:
        if self.exists(path):
            raise FileExistsError(errno.EEXIST, "exists", path)
        self._made.add(path.rstrip("/"))

    def makedirs(self, path: str) -> None:
        if self._split(path)[1] and self._head(path) is not None:
            raise FileExistsError(errno.EEXIST, "an object, not a prefix", path)
        self._made.add(path.rstrip("/"))

    def list_dir(self, path: str) -> list[str]:
        names: set[str] = set()
        for page in self._list(path, delimiter=True):
            prefix = page.get("Prefix", "")
            names.update(o["Key"][len(prefix) :] for o in page.get("Contents", ()))
            names.update(
                p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", ())
            )
        names.discard("")
        if not names and not self.is_dir(path):
            raise FileNotFoundError(errno.ENOENT, "no such bucket, or an object", path)
        return sorted(names)

    def fsync_dir(self, path: str) -> None:
        pass  # a completed put is durable; there are no directory entries to sync

    # -- objects ---------------------------------------------------------------------

    def create(self, path: str) -> S3Writer:
        # Exclusive among this process's writers from now on; among processes, the
        # upload's completion is create-only.
        with self._lock:
            if path in self._creating:
                raise FileExistsError(errno.EEXIST, "object being written", path)
            self._creating.add(path)
        try:
            if self._head(path) is not None:
                raise FileExistsError(errno.EEXIST, "object exists", path)
        except BaseException:
            self._done_creating(path)
            raise
        bucket, key = self._split(path)
        return S3Writer(
            self.client,
            self._uploads,
            path,
            bucket,
            key,
            part_bytes=self._part_bytes,
            max_in_flight=self._max_in_flight,
            on_close=self._done_creating,
        )

    def _done_creating(self, path: str) -> None:
        with self._lock:
            self._creating.discard(path)

    def _reader(self, path: str, size: int, etag: str) -> S3ReadFile:
        bucket, key = self._split(path)
        return S3ReadFile(
            self.client,
            self._downloads,
            path,
            bucket,
            key,
            size=size,
            etag=etag,
            range_bytes=self._range_bytes,
        )

    def open_read(self, path: str) -> S3ReadFile:
        head = self._head(path)
        if head is None:
            if self._split(path)[1] and self._has_children(path):
                raise IsADirectoryError(errno.EISDIR, "a prefix, not an object", path)
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return self._reader(path, int(head["ContentLength"]), head["ETag"])

    def open_directory(self, path: str) -> S3Directory:
        files: dict[str, tuple[int, str]] = {}
        children = False
        for page in self._list(path, delimiter=True):
            prefix = page.get("Prefix", "")
            for o in page.get("Contents", ()):
                files[o["Key"][len(prefix) :]] = (int(o["Size"]), o["ETag"])
            children = children or bool(page.get("CommonPrefixes"))
        if not files and not children and not self._made_here(path):
            if self._head(path) is not None:
                raise NotADirectoryError(errno.ENOTDIR, "an object, not a prefix", path)
            raise FileNotFoundError(errno.ENOENT, "no such prefix", path)
        return S3Directory(self, path, files)

    def read_bytes(self, path: str, *, max_bytes: int) -> bytes:
        bucket, key = self._split(path)

        def get() -> bytes:
            response = self.client.s3.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                if int(response["ContentLength"]) > max_bytes:
                    raise ValueError(f"{path} is larger than {max_bytes} bytes.")
                return bytes(body.read())
            finally:
                body.close()

        return bytes(self._call("GetObject", path, get))

    def put(
        self,
        path: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> None:
        # A put through the Storage interface may be a commit (a manifest, the state
        # file): it is made only while this process still holds the lease it writes under.
        self._confirm_leases(path)
        self.put_object(path, data, if_absent=if_absent, if_version=if_version)

    def _confirm_leases(self, path: str) -> None:
        with self._lock:
            held = [obj for key, (obj, _) in self._leases.items() if path.startswith(key + "/")]
        for obj in held:
            obj.confirm()

    def put_object(
        self, path: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None
    ) -> str:
        """:meth:`put`, returning the new object's ETag (its version)."""
        bucket, key = self._split(path)
        data = bytes(data)
        condition: dict[str, str] = {}
        if if_absent:
            condition["IfNoneMatch"] = "*"
        elif if_version is not None:
            condition["IfMatch"] = if_version
        response = self._call(
            "PutObject",
            path,
            lambda: self.client.s3.put_object(Bucket=bucket, Key=key, Body=data, **condition),
            landed=(lambda: self._holds(path, data)) if condition else None,
            conditional="absent" if if_absent else "version" if if_version is not None else "",
        )
        if response is not None:
            return str(response["ETag"])
        etag = self.version(path)  # the read-back found our bytes there
        if etag is None:
            raise PreconditionFailed(errno.EAGAIN, "removed right after it was written", path)
        return etag

    def _holds(self, path: str, data: bytes) -> bool:
        """Read-back of a conditional put whose outcome is unknown: does ``path`` hold ``data``?"""
        try:
            return self.read_bytes(path, max_bytes=len(data)) == data
        except (FileNotFoundError, ValueError):
            return False

    def version(self, path: str) -> str | None:
        head = self._head(path)
        return None if head is None else str(head["ETag"])

    def size(self, path: str) -> int:
        head = self._head(path)
        if head is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return int(head["ContentLength"])

    def mtime(self, path: str) -> float:
        head = self._head(path)
        if head is not None:
            return float(head["LastModified"].timestamp())
        times = [
            o["LastModified"].timestamp()
            for page in self._list(path, delimiter=False)
            for o in page.get("Contents", ())
        ]
        if not times:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return float(max(times))

    def rename(self, src: str, dst: str) -> None:
        raise OSError(errno.ENOTSUP, "an object store cannot rename", src)

    def exchange(self, a: str, b: str) -> bool:
        return False

    def delete(self, path: str) -> None:
        bucket, key = self._split(path)
        self._call(
            "DeleteObject", path, lambda: self.client.s3.delete_object(Bucket=bucket, Key=key)
        )

    def remove_tree(self, path: str) -> None:
        bucket, key = self._split(path)
        keys = [
            o["Key"] for page in self._list(path, delimiter=False) for o in page.get("Contents", ())
        ]
        if key and self._head(path) is not None:
            keys.append(key)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            response = self._call(
                "DeleteObjects",
                path,
                functools.partial(self.client.s3.delete_objects, Bucket=bucket, Delete=batch),
            )
            failed = response.get("Errors") or []
            if failed:  # never read as success: a kept object would be taken for a checkpoint's
                first = failed[0]
                raise OSError(
                    errno.EIO,
                    f"{len(failed)} objects not deleted, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}",
                    path,
                )
        stripped = path.rstrip("/")
        self._made = {p for p in self._made if p != stripped and not p.startswith(stripped + "/")}

    def abort_uploads(self, directory: str, names: Callable[[str], bool]) -> list[str]:
        """Abort the unfinished multipart uploads below ``directory`` whose path relative
        to it ``names`` accepts (uploads of crashed saves); returns their paths."""
        bucket, key = self._split(directory)
        prefix = f"{key}/" if key else ""
        args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        aborted = []
        while True:
            page = self._call(
                "ListMultipartUploads",
                directory,
                functools.partial(self.client.s3.list_multipart_uploads, **args),
            )
            for upload in page.get("Uploads", ()):
                relative = upload["Key"][len(prefix) :]
                if not names(relative):
                    continue
                url = os.path.join(directory, relative)
                self._call(
                    "AbortMultipartUpload",
                    url,
                    functools.partial(
                        self.client.s3.abort_multipart_upload,
                        Bucket=bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    ),
                )
                aborted.append(url)
            if not page.get("IsTruncated"):
                return aborted
            args["KeyMarker"] = page.get("NextKeyMarker")
            args["UploadIdMarker"] = page.get("NextUploadIdMarker")

    # -- the writer lease ------------------------------------------------------------

    def lease(self, directory: str) -> S3Lease:
        key = directory.rstrip("/")
        with self._lock:
            held = self._leases.get(key)
            if held is None:
                obj = LeaseObject(
                    key,
                    put=self.put_object,
                    read=self._read_lease,
                    delete=self._delete_if,
                    seconds=self._lease_seconds,
                )
                obj.acquire()
                held = (obj, 0)
            self._leases[key] = (held[0], held[1] + 1)
        return S3Lease(self, key)

    def _drop_lease(self, key: str) -> None:
        with self._lock:
            obj, count = self._leases[key]
            if count > 1:
                self._leases[key] = (obj, count - 1)
                return
            del self._leases[key]
        obj.release()

    def _read_lease(self, path: str) -> tuple[bytes, str, float, float] | None:
        bucket, key = self._split(path)
        try:
            response = self._call(
                "GetObject", path, lambda: self.client.s3.get_object(Bucket=bucket, Key=key)
            )
        except FileNotFoundError:
            return None
        data = response["Body"].read(4096)
        response["Body"].close()
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        now = server_time(headers) or time.time()
        return data, str(response["ETag"]), response["LastModified"].timestamp(), now

    def _delete_if(self, path: str, etag: str) -> None:
        bucket, key = self._split(path)
        try:
            self._call(
                "DeleteObject",
                path,
                lambda: self.client.s3.delete_object(Bucket=bucket, Key=key, IfMatch=etag),
            )
        except (FileNotFoundError, PreconditionFailed):
            pass  # gone, or no longer ours

    def close(self) -> None:
        """Stop this storage's upload and download threads."""
        self._uploads.shutdown(wait=True)
        self._downloads.shutdown(wait=True)


class S3Lease:
    """A handle on the writer lease of one prefix, shared by the savers of this process."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._storage = storage
        self._key: str | None = key

    @property
    def released(self) -> bool:
        """True once :meth:`release` ran."""
        return self._key is None

    def release(self) -> None:
        """Give the lease up; the last handle of the process deletes the lease object."""
        if self._key is not None:
            key, self._key = self._key, None
            self._storage._drop_lease(key)


class S3Directory:
    """The objects directly below a prefix as listed when it was opened (names, sizes, ETags).

    Each file is read at the ETag it was listed with, so a reader never mixes objects of
    two saves; :meth:`replaced` says whether the manifest changed since.
    """

    def __init__(self, storage: S3Storage, path: str, files: dict[str, tuple[int, str]]) -> None:
        self._storage = storage
        self._path = path
        self._files = files

    def open_read(self, name: str) -> S3ReadFile:
        listed = self._files.get(name)
        path = os.path.join(self._path, name)
        if listed is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return self._storage._reader(path, *listed)

    def replaced(self) -> bool:
        listed = self._files.get(_MANIFEST)
        now = self._storage.version(os.path.join(self._path, _MANIFEST))
        return now != (None if listed is None else listed[1])

    def close(self) -> None:
        self._files = {}
