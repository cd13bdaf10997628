"""The training state as named tensors plus a JSON tree, and back into the user's objects.

* ``tree.py``: ``flatten_state`` / ``restore_state``, the entry points.
* ``tree_nodes.py``: the vocabulary of the tree (kinds of values, nodes, paths).
* ``tree_flatten.py``, ``tree_restore.py``: the two walks.
* ``host_copies.py``: the batched copies of a restore into host arrays.
* ``adapters/``: one file per framework (NumPy, torch, JAX, stateful objects).
"""
