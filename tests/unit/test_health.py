"""/healthz and /readyz as a load balancer sees them."""
from __future__ import annotations

import pytest

from tests import services


def test_healthz_answers_while_the_process_lives(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok"}


def test_readyz_checks_the_database(client):
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json["checks"] == {"database": "ok"}


def test_readyz_names_an_unreachable_database(make_app, tmp_path):
    app = make_app(SQLALCHEMY_DATABASE_URI=f"postgresql+psycopg://nobody@127.0.0.1:{services.free_port()}/none")
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["checks"]["database"].startswith("unreachable")
    assert response.json["detail"] == "Not ready: database unreachable"


@pytest.mark.redis
def test_readyz_checks_redis_when_configured(make_app, redis_url):
    app = make_app(REDIS_URL=redis_url)
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    assert response.json["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_names_an_unreachable_redis(make_app):
    app = make_app(REDIS_URL=f"redis://127.0.0.1:{services.free_port()}/0")
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.json["checks"]["redis"].startswith("unreachable")
    assert response.json["detail"] == "Not ready: redis unreachable"
