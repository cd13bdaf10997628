"""Helpers shared by the test suite, imported as ``tests.helpers.<module>``.

* ``paths``: the repository root, ``src`` and the subprocess programs in ``tests/_programs``.
* ``clock``: ``FakeClock`` (the ``clock`` fixture of ``tests/conftest.py``).
* ``hooks``: ``CountingHook``, ``RaiseOnceAtCountN``, and ``hooked``/``log_messages`` to
  drive one hook the way TF's hook tests do.
* ``listeners``: ``RecordingListener``, the one recording ``CheckpointSaverListener``.
* ``checkpoints``: states, sessions and flat states to save, and what a directory lists.
* ``torch_dtypes``: every torch dtype trainhooks stores (imports torch).
* ``storage_doubles``: every test ``Storage``: counting, observing, failing at the Nth
  operation, partial writes, slow or held operations, crashing, no atomic swap.
"""
