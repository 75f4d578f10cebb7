"""Fixtures of the in-process agent tests (``agent_support``)."""

from __future__ import annotations

import pytest
from agent_support import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    """The one clock of an in-process agent; it moves only when the test moves it."""
    return FakeClock()
