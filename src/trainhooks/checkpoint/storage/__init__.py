"""Storage: where checkpoint bytes live, how a checkpoint is published, who may write.

* ``base.py``: the ``Storage`` Protocol every backend implements.
* ``local.py``, ``local_file.py``: the local disk (``O_DIRECT``, ``renameat2``, fsyncs).
* ``commit.py``: publishing a checkpoint directory (complete, or not at all),
  recognising, deleting and cleaning up after interrupted saves.
* ``lock.py``: the writer lock, one writing process per directory.

Nothing here knows the checkpoint format beyond the name of its commit record.
"""

from trainhooks.checkpoint.storage.base import Storage, WritableFile
from trainhooks.checkpoint.storage.local import LocalStorage
from trainhooks.checkpoint.storage.local_file import DIRECT_CHUNK_BYTES, LocalFile

__all__ = ["DIRECT_CHUNK_BYTES", "LocalFile", "LocalStorage", "Storage", "WritableFile"]
