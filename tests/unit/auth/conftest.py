"""Fixtures: an app with a route per auth mode (``app``, so ``client``/``identity``/``runner`` use it) and a mocked upstream."""
from __future__ import annotations

import re

import pytest
import responses

from tests.unit.auth.support import ROUTES, UPSTREAM


@pytest.fixture
def app(make_app):
    return make_app(routes=ROUTES)


@pytest.fixture
def upstream():
    """Answers 200 ``up`` to any GET under UPSTREAM; ``upstream.calls`` records what it received."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(re.compile(re.escape(UPSTREAM) + "/.*"), body=b"up")
        yield mock
