"""The curated public surface: every exported name resolves, and nothing imports torch eagerly."""

from __future__ import annotations

import subprocess
import sys

import pytest

import trainhooks as th


@pytest.mark.parametrize("name", th.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(th, name) is not None


@pytest.mark.parametrize("name", th.errors.__all__)
def test_every_error_is_a_trainhooks_error_or_a_builtin_one(name: str) -> None:
    cls = getattr(th.errors, name)
    assert issubclass(cls, th.errors.Error)


def test_import_is_cheap_and_does_not_import_torch() -> None:
    code = "import sys, trainhooks; trainhooks.Session; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        th.Nope  # noqa: B018
    with pytest.raises(AttributeError):
        th.errors.Nope  # noqa: B018
