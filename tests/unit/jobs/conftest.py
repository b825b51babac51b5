"""Fixtures for the job tests: an app on the job route file, with its tables made."""
from __future__ import annotations

import pytest

from tests.unit.jobs.support import routes


@pytest.fixture
def jobs_app(make_app, upstream):
    """``jobs_app(**config)``: an app on the job route file, its tables created."""

    def build(**config):
        from tests.factories import Identity

        app = make_app(routes=routes(upstream.url), **config)
        Identity(app)  # creates the tables
        return app

    return build


@pytest.fixture
def app(jobs_app):
    return jobs_app()
