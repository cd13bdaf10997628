"""Storage: where checkpoint bytes live, how a checkpoint is published, who may write.

* ``base.py``: the ``Storage`` Protocol every backend implements, and what it promises.
* ``resolve.py``: which storage a path lives on (``storage_for``), from its scheme.
* ``local.py``, ``local_file.py``: the local disk (``O_DIRECT``, ``renameat2``, fsyncs).
* ``memory.py``: an in-memory object store (no rename), for tests and ``memory://``.
* ``s3.py``, ``s3_client.py``, ``s3_files.py``, ``s3_lease.py``: S3 and S3-compatible
  stores (``s3://``; the ``s3`` extra, imported only when an ``s3://`` path is used).
* ``commit.py``: publishing a checkpoint (rename, or manifest last), recognising,
  deleting and cleaning up after interrupted saves.
* ``lock.py``: the local writer lease, one writing process per directory.

Nothing here knows the checkpoint format beyond the name of its commit record.
"""

from trainhooks.checkpoint.storage.base import (
    DirectoryReader,
    Lease,
    PreconditionFailed,
    ReadableFile,
    Storage,
    WritableFile,
)
from trainhooks.checkpoint.storage.local import LocalStorage
from trainhooks.checkpoint.storage.local_file import DIRECT_CHUNK_BYTES, LocalFile
from trainhooks.checkpoint.storage.memory import MemoryStorage
from trainhooks.checkpoint.storage.resolve import register_storage, storage_for

__all__ = [
    "DIRECT_CHUNK_BYTES",
    "DirectoryReader",
    "Lease",
    "LocalFile",
    "LocalStorage",
    "MemoryStorage",
    "PreconditionFailed",
    "ReadableFile",
    "Storage",
    "WritableFile",
    "register_storage",
    "storage_for",
]
