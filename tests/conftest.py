"""Fixtures shared by the whole suite (shared helper classes live in ``tests/helpers``)."""

from __future__ import annotations

import pytest
from tests.helpers.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
