"""A griffe extension for the API reference: ``Example:`` sections render as examples.

The docstrings title their runnable examples ``Example:`` (one example, singular, as
TensorFlow's do); griffe's Google-style parser knows only ``Examples:`` and would render
the ``>>>`` lines as plain Markdown, where ``[a]`` and ``[b]`` on consecutive lines
read as a reference link. Renaming the section title before parsing gives them the
examples section's console code blocks. Loaded by ``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename every ``Example:`` section title to ``Examples:`` before parsing."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
