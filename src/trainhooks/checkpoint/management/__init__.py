"""Managing a directory of checkpoints the way ``tf.train`` does.

* ``state_file.py`` (+ ``_text_format.py``): the ``checkpoint`` file in TF's text format.
* ``checkpoint_files.py``: which files make a checkpoint (ours or TensorFlow's).
* ``naming.py``: ``<save_path>-<step>``.
* ``retention.py``: ``max_to_keep`` and ``keep_checkpoint_every_n_hours``.
"""
