"""Fixtures the unit tests of several packages share."""
from __future__ import annotations

import pytest

from tests.unit.jobs.support import upstream_server


@pytest.fixture
def upstream():
    """The loopback upstream (httpbin), its record of requests cleared for this test."""
    server = upstream_server()
    server.reset()
    yield server
    server.gate.set()  # never leave a request of this test held
