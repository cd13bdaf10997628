"""``names.first_duplicate`` (one pass with a set) against its definition.

The callers (``manifest_decode``, ``tree_flatten``) test for a repeat in bulk and ask
``first_duplicate`` which name to report; it must be the first name that equals an
earlier one, the one a reader would point at.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from hypothesis import given
from hypothesis import strategies as st

from trainhooks.checkpoint.format.names import first_duplicate


def _first_duplicate_reference(names: Sequence[Hashable]) -> Hashable | None:
    """The definition, in quadratic time: the first name found among those before it."""
    for i, name in enumerate(names):
        if name in names[:i]:
            return name
    return None


@given(st.lists(st.one_of(st.text("ab/", max_size=2), st.integers(-2, 2)), max_size=12))
def test_first_duplicate_agrees_with_its_definition(names: list[Hashable]) -> None:
    assert first_duplicate(names) == _first_duplicate_reference(names)
    assert first_duplicate(iter(names)) == _first_duplicate_reference(names)  # any iterable


def test_the_first_repeat_is_named_not_the_first_repeated_name() -> None:
    assert first_duplicate(["a", "b", "b", "a"]) == "b"
    assert first_duplicate(["a", "b"]) is None
    assert first_duplicate([]) is None
