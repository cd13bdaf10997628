"""Saving and restoring: what a ``Saver`` does with a state, in the order it does it.

* ``var_list.py``: which part of a session's state a saver covers.
* ``save_job.py``: one save as a job (name, snapshot or flatten, write, record).
* ``snapshot.py``: host copies for a background save, in buffers reused across saves.
* ``background.py``: the one thread that writes background saves.
* ``write.py``: data files, then the manifest, then the commit.
* ``directories.py``: writer locks and crash leftovers per checkpoint directory.
* ``restore.py``: verify everything, then restore in place (or read large tensors in
  place and check them there).
* ``latest.py``: restore the newest checkpoint that verifies, alone or as a job.
"""
