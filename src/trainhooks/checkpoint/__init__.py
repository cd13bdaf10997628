"""Checkpoints: the Saver, the on-disk format, the state file, readers and state adapters."""
