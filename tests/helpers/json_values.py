"""Hypothesis strategies for JSON documents shaped like a manifest's: what the bulk JSON
encoder and decoder (``format/bulk_json.py``, ``format/bulk_loads.py``) are compared
with ``json`` on."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st


def scalars(texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """JSON scalars, with the floats and ints ``json`` writes unusually and ``texts``."""
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([0.0, -0.0, 1.0, 1, True]),
        texts,
    )


def shared(children: st.SearchStrategy[Any], long: int) -> st.SearchStrategy[list[Any]]:
    """A list of up to ``2 * long`` items drawn from a few values, as the tree's leaf
    nodes are."""
    return st.tuples(st.lists(children, min_size=1, max_size=3), st.integers(0, 2 * long)).map(
        lambda pair: [pair[0][i % len(pair[0])] for i in range(pair[1])]
    )
