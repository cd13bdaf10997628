#!/usr/bin/env python3
"""The project's two commands, each self-contained on a fresh machine.

    python3 dev.py demo         # train, checkpoint, crash with SIGKILL, resume (examples/demo.py)
    python3 dev.py test         # lint (ruff), type-check (mypy), layering (import-linter), tests (pytest)
    python3 dev.py test --fast  # the same, but pytest -m "not slow": a quick check while working

``test`` runs every test; it is what CI runs. ``test --fast`` leaves out the tests
marked ``slow`` (SIGKILL crash loops, the demo, the longer tests that run a second
Python process, anything over ~3 s; ``[tool.pytest.ini_options]`` in ``pyproject.toml``).
Both create and fill ``.venv`` on first use (and refresh it when ``pyproject.toml``
changes), so the only requirements are Python 3.10+ and pip. Extra arguments after
``test`` (or ``test --fast``) go to pytest; extra arguments after ``demo`` go to the demo.
Other commands: ``bench`` (benchmarks/run_all.py), ``docs`` (build the documentation site
into ``site/`` with ``mkdocs build --strict``; installs the ``docs`` extra on first use),
``shell`` (print the venv's python).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".trainhooks-installed"
DOCS_STAMP = VENV / ".trainhooks-docs-installed"
# The pinned CPU build; `pip install torch==2.13.0` resolves it without pulling CUDA wheels.
TORCH = "torch==2.13.0"


def _run(*cmd: str | os.PathLike[str]) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_venv() -> None:
    """Create .venv and install the project with its extras unless already current."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        return
    if not PYTHON.exists():
        print(f"Creating virtual environment in {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = (PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    _run(*pip, "--upgrade", "pip")
    # Torch first and pinned, so that the `torch` extra below is already satisfied.
    _run(*pip, TORCH)
    _run(*pip, "-e", ".[torch,test]")
    STAMP.write_text(wanted)


def ensure_docs() -> None:
    """Install the ``docs`` extra (mkdocs and friends) unless already current."""
    # Only `dev.py docs` needs it, so the other commands do not pay for it.
    wanted = STAMP.read_text().strip()
    if DOCS_STAMP.exists() and DOCS_STAMP.read_text().strip() == wanted:
        return
    _run(PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", ".[docs]")
    DOCS_STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "bench", "docs", "shell"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_venv()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if command == "shell":
        print(PYTHON)
        return 0
    if command == "demo":
        return subprocess.run([str(PYTHON), "examples/demo.py", *rest], cwd=ROOT, env=env).returncode
    if command == "bench":
        return subprocess.run([str(PYTHON), "benchmarks/run_all.py", *rest], cwd=ROOT, env=env).returncode
    if command == "docs":
        ensure_docs()
        env["NO_MKDOCS_2_WARNING"] = "1"  # mkdocs-material's banner about its successor
        build = [str(PYTHON), "-m", "mkdocs", "build", "--strict", "--site-dir", "site", *rest]
        return subprocess.run(build, cwd=ROOT, env=env).returncode
    if rest[:1] == ["--fast"]:  # test --fast: every check, every test not marked slow
        rest = ["-m", "not slow", *rest[1:]]
    steps = [
        [str(PYTHON), "-m", "ruff", "check", "src", "tests", "benchmarks", "examples", "tools"],
        [str(PYTHON), "-m", "ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "tools"],
        [str(PYTHON), "-m", "mypy"],
        [str(BIN / "lint-imports")],  # the layering of src/trainhooks ([tool.importlinter])
        [str(PYTHON), "-m", "pytest", "-n", "2", *rest],
    ]
    for step in steps:
        print("+", " ".join(step[1:]), flush=True)
        code = subprocess.run(step, cwd=ROOT, env=env).returncode
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
