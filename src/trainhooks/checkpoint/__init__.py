r"""Checkpoints: the Saver, the on-disk format, the state file, readers and state adapters.

The map of the rooms; an arrow points from a room to the rooms it uses, never back::

    weights.py ------+             plain state_dicts and values, without a session
                     v
    saver.py  reader.py  rng.py      the entry points (re-exported by ``trainhooks``)
         |        |
         v        |
    saving/       |      one save as a job: snapshot, background writer, write, restore
      |  \  \     |
      |   \  distributed/   the process group of a save (one process: a group of one)
      v    v      v
    state/   management/   state <-> named tensors + JSON tree, adapters | state file,
      |          |         checkpoint names, retention
      v          v
    format/                manifest, data files, dtypes, checksums, mapped reads
      |
      v
    storage/               where bytes live (local disk, memory), publishing a
                           checkpoint (rename or manifest last), the writer lease

``gc_pause.py`` is a helper every room may use. The layering is checked by
import-linter (``[tool.importlinter]`` in ``pyproject.toml``) in the test command.
"""
