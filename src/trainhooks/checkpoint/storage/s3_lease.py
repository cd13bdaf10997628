"""The writer lease of a checkpoint prefix on S3: one object, taken create-only, renewed.

The local writer lock is an ``flock`` that the kernel drops when its process dies. An
object store has no such thing, so the lock is a lease: the object
``<dir>/.trainhooks-writer.lock`` (the local lock file's name) holding its owner's id,
host, pid and time to live. It is

* **taken** with a create-only put (``If-None-Match: *``): of two processes, exactly
  one gets it; the other gets :class:`CheckpointDirLockedError` at once, naming the
  holder, as on a local disk;
* **renewed** every third of its time to live by a compare-and-swap put
  (``If-Match`` on the ETag it last wrote), from a daemon thread;
* **taken over** only when it expired, judged by the store's clock (the object's
  ``Last-Modified`` against the ``Date`` of the response, never the local clock), or
  when its holder ran on this host and that process is gone (a SIGKILLed trainer's
  restart need not wait out the lease); the takeover is itself a compare-and-swap, so
  two processes cannot both take over;
* **released** by deleting it, conditionally on the ETag it last wrote.

A process that stalls past the time to live (stopped, swapped out, a long GC pause)
may have lost its lease to another writer without knowing it. So before every commit
(the manifest's put, the state file's) the storage calls :meth:`LeaseObject.confirm`:
if the lease was last confirmed more than half its time to live ago, by this process's
monotonic clock, it is renewed there and then; a renewal that finds another holder
fails the commit with :class:`CheckpointDirLockedError`, and every later one too. What
is left is a stall of more than the time to live between that check and the put just
after it; even then the data objects have names no other save uses, and the manifest
and state file puts are create-only or compare-and-swaps.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from trainhooks.checkpoint.storage.base import PreconditionFailed
from trainhooks.checkpoint.storage.lock import LOCK_FILE_NAME, CheckpointDirLockedError

__all__ = ["DEFAULT_LEASE_SECONDS", "LeaseObject"]

logger = logging.getLogger(__name__)

#: How long a lease lives without renewal.
DEFAULT_LEASE_SECONDS = 60.0
_MAX_LEASE_BYTES = 4096


class LeaseObject:
    """The lease object of one directory, taken by :meth:`acquire`, held until :meth:`release`.

    ``put(path, data, if_absent=, if_version=) -> etag`` is the storage's conditional
    put, ``read(path) -> (data, etag, last_modified, server_now)`` (None if absent) its
    read with the store's clock, ``delete(path, etag)`` its conditional delete.
    """

    def __init__(
        self,
        directory: str,
        *,
        put: Callable[..., str],
        read: Callable[[str], tuple[bytes, str, float, float] | None],
        delete: Callable[[str, str], None],
        seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE_NAME)
        self._put = put
        self._read = read
        self._delete = delete
        self._seconds = seconds
        self._holder = {
            "owner": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "seconds": seconds,
        }
        self._etag: str | None = None
        self._confirmed = 0.0  # monotonic time at which the last successful put was sent
        self._renewing = threading.Lock()  # one compare-and-swap of ours at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self) -> bytes:
        return json.dumps(self._holder, sort_keys=True).encode()

    def acquire(self) -> None:
        """Take the lease, or raise ``CheckpointDirLockedError`` naming the holder."""
        sent = time.monotonic()
        try:
            self._etag = self._put(self.path, self._body(), if_absent=True)
        except FileExistsError:
            self._take_over()
        self._confirmed = sent
        logger.debug("Took the writer lease of %s.", self.directory)
        self._thread = threading.Thread(target=self._renew, name="trainhooks-s3-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        current = self._read(self.path)
        if current is None:  # released meanwhile
            self._etag = self._put(self.path, self._body(), if_absent=True)
            return
        data, etag, last_modified, server_now = current
        holder = _parse(data)
        age = server_now - last_modified
        seconds = float(holder.get("seconds", DEFAULT_LEASE_SECONDS))
        gone = holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))
        if age <= seconds and not gone:
            raise _locked(self.directory, self.path, holder, seconds - age)
        logger.warning(
            "Taking over the writer lease of %s from %s (%s).",
            self.directory,
            _who(holder),
            "its process is gone" if gone else f"expired {age - seconds:.0f} s ago",
        )
        try:
            self._etag = self._put(self.path, self._body(), if_version=etag)
        except PreconditionFailed:
            raise _locked(self.directory, self.path, holder, seconds) from None

    def _renew(self) -> None:
        while not self._stop.wait(self._seconds / 3):
            try:
                if not self._renew_once():
                    return
            except OSError as e:  # the store is unreachable: try again at the next renewal
                logger.warning("Could not renew the writer lease of %s: %s", self.directory, e)

    def _renew_once(self) -> bool:
        """Renew by compare-and-swap; False (and ``lost``) if another process holds it now."""
        with self._renewing:
            if self.lost:
                return False
            sent = time.monotonic()
            try:
                self._etag = self._put(self.path, self._body(), if_version=self._etag)
            except PreconditionFailed:
                self.lost = True
                logger.error(
                    "Lost the writer lease of %s to another process (this one stalled for "
                    "longer than the lease's %.0f s?); its saves will fail to commit.",
                    self.directory,
                    self._seconds,
                )
                return False
            self._confirmed = sent
            return True

    def confirm(self) -> None:
        """Make sure the lease is still this process's, just before a commit.

        Free while renewals keep up; after a stall of more than half the time to live,
        one compare-and-swap renewal.

        Raises:
          CheckpointDirLockedError: another process took the lease over (this one
            stalled past its time to live); every later call raises it too.
          OSError: the store could not be asked.
        """
        if not self.lost and time.monotonic() - self._confirmed <= self._seconds / 2:
            return
        if self.lost or not self._renew_once():
            current = self._read(self.path)
            holder = _parse(current[0]) if current is not None else {}
            raise CheckpointDirLockedError(
                f"Lost the writer lease of checkpoint directory {self.directory}: this "
                f"process was not heard from for longer than the lease's "
                f"{self._seconds:.0f} s, and {_who(holder)} holds it now ({self.path}). "
                "Nothing more is committed from this process; the other one writes there.",
                self.directory,
                _pid(holder),
            )

    def release(self) -> None:
        """Stop renewing and delete the lease object (if it is still ours)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        if self._etag is not None and not self.lost:
            try:
                self._delete(self.path, self._etag)
            except OSError as e:
                logger.warning("Could not release the writer lease of %s: %s", self.directory, e)
        self._etag = None


def _parse(data: bytes) -> dict[str, Any]:
    try:
        holder = json.loads(data[:_MAX_LEASE_BYTES])
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid(holder: dict[str, Any]) -> int | None:
    pid = holder.get("pid")
    return pid if isinstance(pid, int) else None


def _who(holder: dict[str, Any]) -> str:
    if "pid" in holder and "host" in holder:
        return f"process {holder['pid']} on {holder['host']}"
    return "another process"


def _locked(
    directory: str, path: str, holder: dict[str, Any], left: float
) -> CheckpointDirLockedError:
    pid = _pid(holder)
    return CheckpointDirLockedError(
        f"Checkpoint directory {directory} is locked for writing by {_who(holder)} "
        f"({path}, a lease that expires in {max(0.0, left):.0f} s unless renewed). Only one "
        "process may save into a checkpoint directory: stop the other process, or save into "
        "another directory (readers need no lock).",
        directory,
        pid,
    )


def server_time(headers: dict[str, str]) -> float | None:
    """The store's clock from a response's ``Date`` header, in seconds since the epoch."""
    date = headers.get("date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
