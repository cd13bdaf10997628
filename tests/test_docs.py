"""Every public name is documented: a docstring, and an entry in docs/reference.

The public API is ``trainhooks.__all__`` (the list in ``__init__.pyi``). Each name must
have a docstring and a ``::: trainhooks.<Name>`` entry on a page of ``docs/reference``,
and every public method or property of the public classes must have a docstring of its
own (the API reference shows only documented members). The pages are read as plain
Markdown, so this runs without mkdocs; ``python3 dev.py docs`` builds the site itself.
Relative links between the docs are checked here too, since the site build cannot see
the files outside ``docs/`` that they point to (README.md, SECURITY.md).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import re
from pathlib import Path

import pytest

import trainhooks

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "docs" / "reference"
PACKAGE = Path(trainhooks.__file__).resolve().parent

_ENTRY = re.compile(r"^:::\s+trainhooks\.(\S+)\s*$", re.MULTILINE)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _reference_entries() -> set[str]:
    entries: set[str] = set()
    for page in sorted(REFERENCE.glob("*.md")):
        entries.update(_ENTRY.findall(page.read_text(encoding="utf-8")))
    return entries


def _attribute_docstring(name: str) -> str | None:
    """The string literal right after ``name = ...`` in ``trainhooks/__init__.py``."""
    body = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8")).body
    for statement, following in itertools.pairwise(body):
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        assigned = any(isinstance(t, ast.Name) and t.id == name for t in targets)
        if (
            assigned
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
        ):
            value = following.value.value
            return value if isinstance(value, str) else None
    return None


def _docstring(name: str) -> str | None:
    obj = getattr(trainhooks, name)
    if inspect.isclass(obj) or inspect.isroutine(obj) or inspect.ismodule(obj):
        return obj.__doc__  # its own, never an inherited one
    return _attribute_docstring(name)  # a value (``__version__``): documented in the source


def _own_public_members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties of ``cls`` defined in trainhooks (inherited ones too)."""
    members = []
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        owner = next(k for k in cls.__mro__ if name in vars(k))
        if not owner.__module__.startswith("trainhooks"):
            continue  # e.g. NamedTuple's count/index, Exception's args
        raw = vars(owner)[name]
        if isinstance(raw, property):
            members.append((name, raw.fget))
        elif isinstance(raw, (classmethod, staticmethod)):
            members.append((name, raw.__func__))
        elif inspect.isfunction(raw):
            members.append((name, raw))
    return members


PUBLIC = sorted(trainhooks.__all__)
CLASSES = [n for n in PUBLIC if inspect.isclass(getattr(trainhooks, n))]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_docstring(name: str) -> None:
    doc = _docstring(name)
    assert doc and doc.strip(), f"trainhooks.{name} has no docstring"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_has_a_reference_entry(name: str) -> None:
    assert name in _reference_entries(), (
        f"trainhooks.{name} has no '::: trainhooks.{name}' entry in docs/reference/*.md; "
        "add one to the page of its group"
    )


@pytest.mark.parametrize("name", CLASSES)
def test_public_methods_have_docstrings(name: str) -> None:
    cls = getattr(trainhooks, name)
    undocumented = [
        f"{name}.{member}"
        for member, function in _own_public_members(cls)
        if not (getattr(function, "__doc__", None) or "").strip()
    ]
    assert not undocumented, f"public methods without a docstring: {undocumented}"


def test_reference_entries_name_public_objects() -> None:
    """An entry that names nothing (a renamed class) would fail the site build only."""
    for entry in _reference_entries():
        obj: object = trainhooks
        for part in entry.split("."):
            assert hasattr(obj, part), (
                f"docs/reference names trainhooks.{entry}, which does not exist"
            )
            obj = getattr(obj, part)


@pytest.mark.parametrize(
    "page",
    sorted([*ROOT.glob("docs/**/*.md"), *ROOT.glob("*.md")], key=str),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_resolve(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to missing files: {broken}"
