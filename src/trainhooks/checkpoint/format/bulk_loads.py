"""``json.loads`` of a manifest whose long arrays of lists are decoded in bulk, or None.

A manifest of 100k tensors holds arrays of 100k lists: the files' shapes column and the
state tree's leaf nodes (``["numpy","F32",[256]]``), a few distinct ones each repeated
many times. ``json.loads`` makes new lists for every item (~0.45 us for a leaf node);
:func:`loads` splits such an array's text into its items' texts (one ``str.split``) and
decodes each *distinct* one once, and leaves the rest of the document to ``json.loads``.
(Arrays of strings, the names, gain nothing from this: ``json.loads`` makes a string
about as fast as ``str.split`` does.)

It is exact or nothing. The long arrays are cut out of the text and each replaced by the
constant ``-Infinity``; the document that is left is parsed by ``json.loads``, whose
``parse_constant`` hook numbers the ``-Infinity`` s it meets and whose
``object_pairs_hook`` puts each array's value in place of its number. The result is used
only when the text held no ``Infinity`` of its own and no ``NaN`` was met, every cut-out
array was met exactly once as an object member's value (not inside a string, not split
across tokens), and the document parsed three levels deeper than it is (so the arrays put
back cannot take it past the parser's nesting limit). It is then the value
``json.loads`` gives for the whole text: the text is that document with each stand-in
replaced by an array whose items' texts each decoded as a JSON value, and JSON has one
parse (``tests/checkpoint/format/test_bulk_loads.py`` compares the two on varied and
hostile documents). Anything else returns None and the caller parses the text with
``json.loads``, which then raises its own errors.

Equal items of one array are decoded once and shared, as ``flatten_state``'s own tree
shares its leaf nodes: treat the result as read-only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["loads"]

#: Arrays of fewer items are left to ``json.loads``.
_LONG = 64
# Where an object member's value is an array: the candidates, when far enough apart.
_MEMBER_ARRAY = re.compile(r'":\[')
_SHORTEST = 2 * _LONG  # characters of _LONG items and their commas, at the least
#: An array is decoded in bulk when each distinct item repeats this many times on average.
_SHARED = 4
# The cut-out arrays' stand-in; a document holding "Infinity" anywhere is left to json.
_HOLE = "-Infinity"
# Deeper than any cut-out array (an array of lists of lists) is.
_DEPTH = 3


class _Hole:
    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def loads(text: str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any]) -> Any:
    """``json.loads(text, object_pairs_hook=object_pairs_hook)``, or None when this cannot
    tell it without parsing every item (no long arrays, or anything unusual): the caller
    then runs ``json.loads`` itself.

    ``object_pairs_hook`` must return a ``dict`` of the pairs (it may raise to refuse them).

    Example:
        >>> loads('{"w":' + str(list(range(64))) + "}", dict) is None  # ints: json's own
        True
        >>> doc = loads('{"shapes":[' + ",".join(["[2,3]"] * 64) + "]}", dict)
        >>> len(doc["shapes"]), doc["shapes"][0]
        (64, [2, 3])
    """
    if "Infinity" in text:  # so every -Infinity met is a hole (a NaN met is refused)
        return None
    starts = np.fromiter(map(_end, _MEMBER_ARRAY.finditer(text)), np.int64) - 1  # the [s
    # An array is at least _SHORTEST characters long: one closer to the next cannot be.
    far = starts[np.diff(starts, append=len(text)) >= _SHORTEST].tolist()
    pieces: list[str] = []
    values: list[list[Any]] = []
    closes = _Closes(text)
    done = tried = 0  # the text is copied up to done, and looked at up to tried
    for start in far:
        if start < tried or start + 1 >= len(text) or text[start + 1] != "[":
            continue  # inside an array already cut out or tried, or not an array of lists
        end, value = _lists(text, start, closes)
        tried = end  # what lies inside is left to json.loads too: each text split once
        if value is None:
            continue
        pieces += [text[done:start], _HOLE]
        values.append(value)
        done = end
    if not values:
        return None
    pieces.append(text[done:])
    return _parse("".join(pieces), values, object_pairs_hook)


_end = re.Match.end


class _Closes:
    """Where an object member's array value may end after a position: the first ``],"``
    or ``]}``. Asked in increasing order, so the text is searched once in all."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._found = {'],"': -1, "]}": -1}

    def after(self, start: int) -> int:
        for mark, at in self._found.items():
            if at < start and at != len(self._text):
                at = self._text.find(mark, start)
                self._found[mark] = len(self._text) if at < 0 else at
        return min(self._found.values())


def _lists(text: str, start: int, closes: _Closes) -> tuple[int, list[Any] | None]:
    """The array of lists at ``start``, each with no ``],[`` inside: its end and its
    items, equal ones decoded once and shared; or where it seems to end and None."""
    # A member's value ends at "]" and the next key or the object's end: the first such
    # "]" ends the array unless an item holds one (then its pieces do not parse).
    end = closes.after(start) + 1
    if end > len(text) or text[end - 2] != "]":
        return end, None
    pieces = text[start + 2 : end - 2].split("],[")
    if len(pieces) < _LONG:
        return end, None
    # "[" + each piece + "]" joined by "," is the array's text: when each of them is a
    # JSON value, they are its items.
    try:
        if pieces.count(pieces[0]) == len(pieces):  # all alike (a state of one kind of array)
            return end, [json.loads("[" + pieces[0] + "]")] * len(pieces)
        distinct = set(pieces)
        if len(distinct) * _SHARED > len(pieces):  # mostly distinct: json.loads is as fast
            return end, None
        decoded = {p: json.loads("[" + p + "]") for p in distinct}
    except (ValueError, RecursionError):  # json.loads of the whole text will say
        return end, None
    return end, list(map(decoded.__getitem__, pieces))


def _parse(
    text: str, values: list[list[Any]], object_pairs_hook: Callable[[list[tuple[str, Any]]], Any]
) -> Any:
    """Parse ``text`` with each ``-Infinity`` replaced by the next of ``values``; None
    unless each was met once, as an object member's value."""
    holes: list[_Hole] = []
    foreign = False  # a NaN of the document's own: then no -Infinity is sure to be a hole
    placed = 0

    def hole(name: str) -> _Hole | None:
        nonlocal foreign
        if name != _HOLE:
            foreign = True
            return None
        holes.append(_Hole(len(holes)))
        return holes[-1]

    def pairs(items: list[tuple[str, Any]]) -> Any:
        nonlocal placed
        if placed < len(holes):  # a hole met since the last was placed lies in here
            for i, (key, value) in enumerate(items):
                if type(value) is _Hole:
                    items[i] = (key, values[value.index])
                    placed += 1
        return object_pairs_hook(items)

    wrapped = "[" * _DEPTH + text + "]" * _DEPTH
    try:
        doc = json.loads(wrapped, object_pairs_hook=pairs, parse_constant=hole)
    except (ValueError, RecursionError):  # json.loads of the whole text will say
        return None
    if foreign or len(holes) != len(values) or placed != len(values):
        return None
    for _ in range(_DEPTH):
        if type(doc) is not list or len(doc) != 1:
            return None
        doc = doc[0]
    return doc
