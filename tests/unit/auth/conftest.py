"""Fixtures: an app with a route per auth mode (``app``, so ``client``/``identity``/``runner`` use it) and a stub upstream."""
from __future__ import annotations

import re
import types

import pytest

from tests.stub_upstream import StubUpstream
from tests.unit.auth.support import ROUTES, UPSTREAM


@pytest.fixture
def upstream():
    """Answers 200 ``up`` to any GET; ``upstream.calls`` records what it received."""
    with StubUpstream() as stub:
        stub.add("GET", re.compile("/.*"), body=b"up")
        yield stub


@pytest.fixture
def make_app(make_app, upstream):
    """The shared ``make_app``, with the route file's UPSTREAM (support.py) pointed at the stub upstream."""

    def build(routes: str = ROUTES, **config):
        return make_app(routes=routes.replace(UPSTREAM, upstream.url), **config)

    return build


@pytest.fixture
def app(make_app):
    return make_app(routes=ROUTES)


@pytest.fixture
def clock(monkeypatch):
    """The key cache's clock, moved by the test (``clock.advance(seconds)``); request it before
    building the app, whose cache reads it."""
    from app.auth import keys
    from tests.unit.auth.support import Clock

    clock = Clock()
    monkeypatch.setattr(keys, "time", types.SimpleNamespace(monotonic=clock))
    return clock
