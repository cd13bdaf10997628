"""Where things are, for tests that start Python programs of their own."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
# Programs the tests run as subprocesses (by path, or imported for their constants).
PROGRAMS = ROOT / "tests" / "_programs"
