"""The checkpoint format: what the bytes of a checkpoint directory mean.

* ``tensor.py``, ``dtypes.py``: one array as bytes, and its dtype codes.
* ``columns.py``, ``flat_check.py``: the tensors of a state as columns, checked.
* ``datafile.py``: standard safetensors data files, written from the state's memory.
* ``manifest.py``, ``manifest_decode.py``: the commit record with checksums, and its
  hostile-input-safe reader.
* ``mapped_checkpoint.py``, ``opening.py``: an opened checkpoint, checksummed on use.
"""
