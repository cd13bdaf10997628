"""Fixtures for the hook tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trainhooks.hooks.summary import SummaryWriterCache


@pytest.fixture(autouse=True)
def _close_cached_writers() -> Iterator[None]:
    """Each test starts without cached event writers (they are per directory, process-wide)."""
    yield
    SummaryWriterCache.clear()
