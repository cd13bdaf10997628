"""Hooks that act around training steps: timers, checkpoints, logging, summaries, profiling."""
