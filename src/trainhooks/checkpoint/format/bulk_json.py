"""Compact JSON for the long columns of a checkpoint, built in bulk: ``json.dumps``'s text.

A state of 100k tensors puts lists of 100k items into the state tree (its keys, and
its values: a few distinct leaf nodes, each shared by many arrays) and into the
manifest (names, dtype codes, shapes). ``json.dumps`` encodes every item afresh (~0.7 us
per shared leaf node); :func:`dumps` encodes each distinct item of a long list once and
joins, and joins strings that need no escaping without looking at them one by one. The
text is the same as ``json.dumps(value, separators=(",", ":"))``, a property test
(``tests/checkpoint/format/test_bulk_json.py``) checks it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import chain
from typing import Any

__all__ = ["Texts", "dumps", "is_plain", "string_array"]

_SEPARATORS = (",", ":")
#: Lists shorter than this are walked (when they hold containers) or left to ``json.dumps``.
_LONG = 64


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=_SEPARATORS)


#: The characters ``json.dumps`` writes as they are: printable ASCII but quote and backslash.
_AS_IS = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def is_plain(text: str) -> bool:
    """Whether ``json.dumps`` leaves every character of ``text`` as it is (printable ASCII,
    no quote or backslash): then ``"`` + ``text`` + ``"`` is its JSON string.

    Example:
        >>> is_plain("model/fc.weight"), is_plain("caf\u00e9"), is_plain('a"b')
        (True, False, False)
    """
    # translate() deletes the plain bytes in one C pass: ~3 ms for 100k names, half of
    # str.isprintable().
    return text.isascii() and not text.encode("ascii").translate(None, _AS_IS)


def string_array(strings: Sequence[str]) -> str:
    """``json.dumps(list(strings))``, compact; one join when no string needs escaping.

    Example:
        >>> string_array(["w", "b/0"]), string_array(['say "hi"'])
        ('["w","b/0"]', '["say \\\\"hi\\\\""]')
    """
    if not strings:
        return "[]"
    try:
        joined = "".join(strings)
    except TypeError:  # not all strings: json.dumps says what it makes of them
        return _dumps(list(strings))
    if is_plain(joined):
        return '["' + '","'.join(strings) + '"]'
    return _dumps(list(strings))


#: Long lists that never change once made, by id, each with its text once encoded (None
#: before): ``{id(items): (items, text)}``. Holding the list keeps its id its own.
Texts = dict[int, tuple[Any, "str | None"]]


def dumps(value: Any, texts: Texts | None = None) -> str:
    """``json.dumps(value, separators=(",", ":"))``, with long lists encoded in bulk.

    Dicts with str keys and lists are walked; a long list is joined from one encoding per
    distinct item (by identity, or by value for tuples of ints such as shapes) when its
    items repeat, or from its strings when it holds only strings; everything else is
    ``json.dumps``'s own. A long list that is in ``texts`` (that very object) is encoded
    once, its text kept there for the next call: pass only lists that are never modified
    (a flatten memo's, ``saving/layout.py``).

    Raises:
      TypeError, ValueError, RecursionError: as ``json.dumps`` (an unsupported value, a
        circular reference).

    Example:
        >>> leaf = ["numpy", "F32", [2]]
        >>> dumps({"dict": ["a", "b"], "values": [leaf, leaf]})
        '{"dict":["a","b"],"values":[["numpy","F32",[2]],["numpy","F32",[2]]]}'
    """
    kind = type(value)
    if kind is dict:
        if set(map(type, value)) - {str}:
            return _dumps(value)  # json.dumps's own rendering of non-str keys
        items = value.items()
        return "{" + ",".join([f"{_key(k)}:{dumps(v, texts)}" for k, v in items]) + "}"
    if kind is list or kind is tuple:
        if len(value) >= _LONG:
            known = None if texts is None else texts.get(id(value))
            if texts is None or known is None or known[0] is not value:
                return _long_list(value, texts)
            text = known[1]
            if text is None:
                text = _long_list(value, texts)
                texts[id(value)] = (value, text)
            return text
        if any(type(v) in _CONTAINERS for v in value):
            return "[" + ",".join([dumps(v, texts) for v in value]) + "]"
    return _dumps(value)


_CONTAINERS = frozenset({dict, list, tuple})


def _key(key: str) -> str:
    return f'"{key}"' if is_plain(key) else _dumps(key)


def _long_list(items: Sequence[Any], texts: Texts | None) -> str:
    # Shared items (the tree's leaf nodes): one encoding each. A sample first, since
    # telling 100k distinct items apart costs more than encoding them.
    if len(set(map(id, items[:_LONG]))) * 2 <= _LONG:
        ids = list(map(id, items))
        distinct = set(ids)
        if 2 * len(distinct) <= len(items):
            if len(distinct) <= _LONG:  # a few kinds of arrays: find each in C
                by_id = {i: items[ids.index(i)] for i in distinct}
            else:
                by_id = {id(v): v for v in items}
            encoded = {i: dumps(v, texts) for i, v in by_id.items()}
            return "[" + ",".join(map(encoded.__getitem__, ids)) + "]"
    types = set(map(type, items))
    if types == {str}:
        return string_array(items)
    if types == {tuple}:
        # Tuples of ints (shapes): equal ones have the same text, so a value is a key.
        try:
            kinds = set(items)
        except TypeError:  # a tuple holding a list
            return _dumps(items)
        if 2 * len(kinds) <= len(items) and set(map(type, chain.from_iterable(kinds))) <= {int}:
            text = {t: _dumps(t) for t in kinds}
            return "[" + ",".join(map(text.__getitem__, items)) + "]"
    return _dumps(items)  # distinct items: json.dumps's C loop is as fast as any
