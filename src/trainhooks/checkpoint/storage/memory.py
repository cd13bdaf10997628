"""``MemoryStorage``: checkpoints in this process's memory, stored the way an object store does.

Objects are immutable byte strings under flat keys; a "directory" is a key prefix that
exists while some object lives under it. There is no rename, so checkpoints are
published by writing the manifest last (``commit.py``), exactly as on an object store.
Useful for tests, and for checkpoints a program only needs while it runs.

Paths use the ``memory://`` scheme (``"memory://bucket/run/model.ckpt-10"``); every
``MemoryStorage`` has its own objects, and :func:`~trainhooks.checkpoint.storage.storage_for`
hands out one shared instance for ``memory://`` paths.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from collections.abc import Sequence

from trainhooks.checkpoint.storage.base import PreconditionFailed

__all__ = ["MemoryStorage"]

_version_counter = itertools.count(1)


class _Object:
    __slots__ = ("data", "mtime", "version")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.mtime = time.time()
        self.version = str(next(_version_counter))


class MemoryStorage:
    """An in-memory object store: flat keys, whole-object puts, no rename.

    Example:
        >>> storage = MemoryStorage()
        >>> storage.put("memory://b/run/checkpoint", b"x")
        >>> storage.list_dir("memory://b/run")
        ['checkpoint']
    """

    can_rename = False

    def __init__(self) -> None:
        self._objects: dict[str, _Object] = {}
        self._lock = threading.Lock()
        self._leases: dict[str, int] = {}
        # Prefixes made with mkdir/makedirs: an empty "directory" exists until removed,
        # as a folder marker does on an object store.
        self._dirs: set[str] = set()
        self._creating: set[str] = set()  # names of objects being written

    def __repr__(self) -> str:
        return f"MemoryStorage({len(self._objects)} objects)"

    # -- keys and prefixes ---------------------------------------------------------

    @staticmethod
    def _key(path: str) -> str:
        return path.rstrip("/")

    def _children(self, path: str) -> set[str]:
        prefix = self._key(path) + "/"
        with self._lock:
            keys = [k for k in (*self._objects, *self._dirs) if k.startswith(prefix)]
        return {k[len(prefix) :].split("/", 1)[0] for k in keys}

    def exists(self, path: str) -> bool:
        key = self._key(path)
        with self._lock:
            if key in self._objects or key in self._dirs:
                return True
        return bool(self._children(path))

    def is_dir(self, path: str) -> bool:
        key = self._key(path)
        if "/" not in key.split("://", 1)[-1]:
            return True  # a bucket always exists
        with self._lock:
            if key in self._dirs:
                return True
        return bool(self._children(path))

    def mkdir(self, path: str) -> None:
        key = self._key(path)
        with self._lock:
            taken = key in self._objects or key in self._dirs
            if not taken:
                prefix = key + "/"
                taken = any(k.startswith(prefix) for k in (*self._objects, *self._dirs))
            if taken:
                raise FileExistsError(errno.EEXIST, "exists", path)
            self._dirs.add(key)

    def makedirs(self, path: str) -> None:
        key = self._key(path)
        with self._lock:
            if key in self._objects:
                raise FileExistsError(errno.EEXIST, "an object, not a prefix", path)
            self._dirs.add(key)

    def list_dir(self, path: str) -> list[str]:
        children = self._children(path)
        if not children and not self.is_dir(path):
            raise FileNotFoundError(errno.ENOENT, "no such prefix", path)
        return sorted(children)

    # -- objects -------------------------------------------------------------------

    def create(self, path: str) -> _MemoryWriter:
        key = self._key(path)
        with self._lock:  # create-exclusive: the name is reserved until the writer closes
            if key in self._objects or key in self._dirs or key in self._creating:
                raise FileExistsError(errno.EEXIST, "object exists", path)
            self._creating.add(key)
        return _MemoryWriter(self, key)

    def _store(self, key: str, data: bytes) -> None:
        with self._lock:
            self._objects[key] = _Object(data)

    def _get(self, path: str) -> _Object:
        with self._lock:
            obj = self._objects.get(self._key(path))
        if obj is None:
            if self._children(path):
                raise IsADirectoryError(errno.EISDIR, "a prefix, not an object", path)
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return obj

    def open_read(self, path: str) -> _MemoryReadFile:
        return _MemoryReadFile(self._get(path).data)

    def open_directory(self, path: str) -> _MemoryDirectory:
        from trainhooks.checkpoint.storage.commit import MANIFEST_NAME

        key = self._key(path)
        with self._lock:
            if key in self._objects:
                raise NotADirectoryError(errno.ENOTDIR, "an object, not a prefix", path)
            below = {
                k[len(key) + 1 :]: o.data
                for k, o in self._objects.items()
                if k.startswith(key + "/") and "/" not in k[len(key) + 1 :]
            }
        if not below and not self._children(path):
            raise FileNotFoundError(errno.ENOENT, "no such prefix", path)
        manifest = os.path.join(path, MANIFEST_NAME)
        return _MemoryDirectory(self, path, below, self.version(manifest))

    def read_bytes(self, path: str, *, max_bytes: int) -> bytes:
        data = self._get(path).data
        if len(data) > max_bytes:
            raise ValueError(f"{path} is larger than {max_bytes} bytes.")
        return data

    def put(
        self,
        path: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> None:
        key = self._key(path)
        with self._lock:
            current = self._objects.get(key)
            if if_absent and current is not None:
                raise FileExistsError(errno.EEXIST, "object exists", path)
            if if_version is not None and (current is None or current.version != if_version):
                raise PreconditionFailed(errno.EAGAIN, f"changed since version {if_version}", path)
            self._objects[key] = _Object(bytes(data))

    def version(self, path: str) -> str | None:
        with self._lock:
            obj = self._objects.get(self._key(path))
        return None if obj is None else obj.version

    def size(self, path: str) -> int:
        return len(self._get(path).data)

    def mtime(self, path: str) -> float:
        key = self._key(path)
        with self._lock:
            obj = self._objects.get(key)
            if obj is not None:
                return obj.mtime
            below = [o.mtime for k, o in self._objects.items() if k.startswith(key + "/")]
        if not below:
            raise FileNotFoundError(errno.ENOENT, "no such object", path)
        return max(below)

    def rename(self, src: str, dst: str) -> None:
        raise OSError(errno.ENOTSUP, "an object store cannot rename", src)

    def exchange(self, a: str, b: str) -> bool:
        return False

    def delete(self, path: str) -> None:
        with self._lock:
            self._objects.pop(self._key(path), None)

    def remove_tree(self, path: str) -> None:
        key = self._key(path)
        with self._lock:
            for k in [k for k in self._objects if k == key or k.startswith(key + "/")]:
                del self._objects[k]
            self._dirs = {d for d in self._dirs if d != key and not d.startswith(key + "/")}

    def fsync_dir(self, path: str) -> None:
        pass  # every put is durable (for as long as the process lives)

    def lease(self, directory: str) -> _MemoryLease:
        # Only this process can see these objects, so, like the local writer lock within
        # a process, the lease is shared by every saver of the process (counted).
        key = self._key(directory)
        with self._lock:
            self._leases[key] = self._leases.get(key, 0) + 1
        return _MemoryLease(self, key)

    def leased(self, directory: str) -> bool:
        """True while some saver holds the lease of ``directory``."""
        with self._lock:
            return self._leases.get(self._key(directory), 0) > 0


class _MemoryWriter:
    """A new object, visible from its ``fsync`` on (a completed upload); its name is
    reserved from ``create`` until ``close``."""

    def __init__(self, storage: MemoryStorage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._parts: list[bytes] = []
        self._synced = False
        self._closed = False

    def write(self, buffers: Sequence[memoryview | bytes]) -> None:
        self._parts.extend(bytes(b) for b in buffers)

    def fsync(self) -> None:
        self._storage._store(self._key, b"".join(self._parts))
        self._synced = True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._parts = []
            with self._storage._lock:
                self._storage._creating.discard(self._key)


class _MemoryDirectory:
    """The objects under a prefix as they were when it was opened (their bytes are
    immutable, so holding them is a consistent snapshot)."""

    def __init__(
        self, storage: MemoryStorage, path: str, files: dict[str, bytes], manifest: str | None
    ) -> None:
        self._storage = storage
        self._path = path
        self._files = files
        self._manifest = manifest

    def open_read(self, name: str) -> _MemoryReadFile:
        data = self._files.get(name)
        if data is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", os.path.join(self._path, name))
        return _MemoryReadFile(data)

    def replaced(self) -> bool:
        from trainhooks.checkpoint.storage.commit import MANIFEST_NAME

        return self._storage.version(os.path.join(self._path, MANIFEST_NAME)) != self._manifest

    def close(self) -> None:
        self._files = {}


class _MemoryReadFile:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def view(self) -> memoryview:
        return memoryview(self._data)

    def populate(self, start: int, length: int) -> None:
        """Nothing to do: the bytes are in memory."""

    def readinto(self, position: int, buffer: memoryview) -> int:
        piece = self._data[position : position + len(buffer)]
        buffer[: len(piece)] = piece
        return len(piece)

    def close(self) -> None:
        pass


class _MemoryLease:
    def __init__(self, storage: MemoryStorage, key: str) -> None:
        self._storage = storage
        self._key: str | None = key

    @property
    def released(self) -> bool:
        return self._key is None

    def release(self) -> None:
        if self._key is not None:
            leases = self._storage._leases
            with self._storage._lock:
                leases[self._key] -= 1
                if not leases[self._key]:
                    del leases[self._key]
            self._key = None
