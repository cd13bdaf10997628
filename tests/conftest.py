"""Fixtures shared by the whole suite (shared helper classes live in ``tests/helpers``)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from tests.helpers.clock import FakeClock

# No per-example deadline for any property test: on a busy machine an example that takes
# milliseconds can take a second, which is no failure of the code under test. Everything
# else stays Hypothesis's default or what a test's own @settings says.
settings.register_profile("trainhooks", deadline=None)
settings.load_profile("trainhooks")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# A test marked slow (crash loops, the demo, second processes) may take this long; every
# other test has the `timeout` of [tool.pytest.ini_options] in pyproject.toml.
SLOW_TEST_TIMEOUT_S = 600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.hasplugin("timeout"):
        return
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT_S))
