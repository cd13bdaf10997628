"""The ``>>>`` examples in the docstrings of ``src/trainhooks`` run, and print what they say.

Every example runs except those marked ``# doctest: +SKIP`` (examples that need a GPU,
another process, or a checkpoint directory the reader has) and the few listed in
``KNOWN_FAILURES`` below. Each module's examples run in a fresh temporary directory,
which is also where ``tempfile`` puts what they create, so an example that writes files
leaves nothing behind.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import tempfile
from pathlib import Path

import pytest

import trainhooks

MODULES = sorted(
    [
        "trainhooks",
        *(m.name for m in pkgutil.walk_packages(trainhooks.__path__, prefix="trainhooks.")),
    ]
)

# Examples that do not run yet, by module and doctest name ("module.Class.method"). Each
# entry is a bug in that docstring: fix the example and remove the entry.
KNOWN_FAILURES: dict[str, set[str]] = {}

OPTIONS = doctest.ELLIPSIS


def _doctests(module_name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(module_name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    return [t for t in finder.find(module, module_name) if t.examples]


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(
    module_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    known = KNOWN_FAILURES.get(module_name, set())
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    failed = []
    for test in _doctests(module_name):
        if test.name in known:
            continue
        result = runner.run(test, out=failed.append, clear_globs=True)
        del result
    assert not failed, "".join(failed)


def test_known_failures_name_existing_examples() -> None:
    """A fixed or renamed example must leave the list, or it would hide a new failure."""
    for module_name, names in KNOWN_FAILURES.items():
        present = {t.name for t in _doctests(module_name)}
        assert names <= present, f"{module_name}: no examples named {sorted(names - present)}"
