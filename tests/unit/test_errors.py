"""Problem details (RFC 9457): every error the gateway answers has the same JSON shape."""
from __future__ import annotations

import pytest
from flask import Flask, abort
from werkzeug.exceptions import MethodNotAllowed

from app import errors
from app.errors import (
    DatabaseUnavailable,
    ProblemError,
    database_errors,
    problem_response,
)
from app.gateway import request_id
from app.gateway.types import BreakerOpen, UpstreamTimeout


class OutOfStock(ProblemError):
    status, title, slug = 409, "Out of stock", "out-of-stock"


@pytest.fixture
def app():
    app = Flask("errors-test")
    app.config["API_PREFIX"] = "/_gateway"
    request_id.init_app(app)
    errors.init_app(app)

    @app.get("/stock")
    def stock():
        raise OutOfStock("Item 7 is out of stock", headers={"Retry-After": "120"}, item=7, restock="2030-01-01")

    @app.get("/breaker")
    def breaker():
        raise BreakerOpen("Every target of upstream 'svc' is open", headers={"Retry-After": "30"})

    @app.get("/timeout")
    def timeout():
        raise UpstreamTimeout("The upstream did not answer within 3 s")

    @app.get("/router-405")
    def router_405():
        raise MethodNotAllowed(valid_methods=["POST", "GET", "HEAD"])

    @app.get("/bad")
    def bad():
        abort(400, description="The cursor is not valid")

    @app.get("/crash")
    def crash():
        raise RuntimeError("database password is hunter2")

    return app


@pytest.fixture
def client(app):
    return app.test_client()


def test_a_gateway_problem_is_problem_json(client):
    response = client.get("/stock", headers={"X-Request-ID": "req-1"})

    assert response.status_code == 409
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json == {
        "type": "/_gateway/problems/out-of-stock",
        "title": "Out of stock",
        "status": 409,
        "detail": "Item 7 is out of stock",
        "request_id": "req-1",
        "item": 7,
        "restock": "2030-01-01",
    }
    assert response.headers["Retry-After"] == "120"


def test_the_problem_type_lives_under_the_api_prefix(app, client):
    app.config["API_PREFIX"] = "/admin"

    assert client.get("/stock").json["type"] == "/admin/problems/out-of-stock"


@pytest.mark.parametrize(
    ("path", "status", "title", "slug", "retry_after"),
    [
        ("/breaker", 503, "Service Unavailable", "breaker-open", "30"),
        ("/timeout", 504, "Gateway Timeout", "upstream-timeout", None),
    ],
)
def test_upstream_problems_carry_their_status_and_type(client, path, status, title, slug, retry_after):
    response = client.get(path)

    assert response.status_code == status
    assert response.json["status"] == status
    assert response.json["title"] == title
    assert response.json["type"] == f"/_gateway/problems/{slug}"
    assert response.headers.get("Retry-After") == retry_after


def test_an_unknown_path_is_a_404_problem(client):
    response = client.get("/nowhere")

    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["type"] == "about:blank"
    assert response.json["title"] == "Not Found"
    assert response.json["detail"] == "No route matches /nowhere"


def test_a_405_names_the_allowed_methods(client):
    response = client.delete("/stock")

    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD, OPTIONS"
    assert response.json["status"] == 405
    assert response.json["detail"] == "DELETE is not allowed on /stock; allowed: GET, HEAD, OPTIONS"


def test_the_routers_405_names_its_methods_sorted(client):
    response = client.get("/router-405")

    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD, POST"


def test_an_http_error_keeps_its_description(client):
    response = client.get("/bad")

    assert response.status_code == 400
    assert response.json["title"] == "Bad Request"
    assert response.json["detail"] == "The cursor is not valid"


def test_a_crash_is_a_500_that_does_not_leak_the_error(client):
    response = client.get("/crash")

    assert response.status_code == 500
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["detail"] == "The gateway failed to handle the request"
    assert "hunter2" not in response.get_data(as_text=True)
    assert response.json["request_id"] == response.headers["X-Request-ID"]


def test_problem_response_without_a_request_id_omits_it():
    app = Flask("bare")

    with app.test_request_context("/"):
        response = problem_response(429, "Too Many Requests", "Slow down", headers={"Retry-After": "5"}, limit=10)

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "5"
    assert response.json == {
        "type": "about:blank",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "Slow down",
        "limit": 10,
    }


def _database_errors() -> dict[str, BaseException]:
    """What the database layer raises, by name: SQLAlchemy's wrappers of a psycopg error, its
    own pool and disconnect errors, and psycopg's errors raised directly."""
    import psycopg
    from sqlalchemy import exc

    refused = psycopg.OperationalError('connection to server at "127.0.0.1", port 5432 failed: Connection refused')
    dropped = exc.DBAPIError("SELECT 1", {}, psycopg.DatabaseError("server closed the connection"), connection_invalidated=True)
    return {
        "refused": exc.OperationalError("SELECT 1", {}, refused),
        "interface": exc.InterfaceError("SELECT 1", {}, psycopg.InterfaceError("the connection is closed")),
        "invalidated": dropped,
        "disconnection": exc.DisconnectionError("the connection was lost"),
        "pool timeout": exc.TimeoutError("QueuePool limit of size 5 overflow 10 reached, connection timed out"),
        "psycopg": refused,
        "NUL": exc.DataError("SELECT 1", {}, psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")),
        "duplicate": exc.IntegrityError("INSERT", {}, psycopg.IntegrityError("duplicate key")),
        "bad SQL": exc.ProgrammingError("SELECT", {}, psycopg.ProgrammingError("syntax error")),
    }


UNREACHABLE = ["refused", "interface", "invalidated", "disconnection", "pool timeout", "psycopg"]


@pytest.fixture
def database_app(app):
    errors_by_name = _database_errors()

    @app.get("/db/<name>")
    def database(name: str):
        raise errors_by_name[name]

    return app


@pytest.mark.parametrize("name", UNREACHABLE)
def test_a_database_that_cannot_be_reached_is_a_503_database_unavailable(database_app, name):
    response = database_app.test_client().get(f"/db/{name}", headers={"X-Request-ID": "req-db"})

    assert response.status_code == 503
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["Retry-After"] == "5"
    assert response.json == {
        "type": "/_gateway/problems/database-unavailable",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "The database cannot be reached right now; retry in 5 s",
        "request_id": "req-db",
    }
    assert "5432" not in response.get_data(as_text=True)


@pytest.mark.parametrize("name", ["NUL", "duplicate", "bad SQL"])
def test_other_database_errors_stay_500s(database_app, name):
    response = database_app.test_client().get(f"/db/{name}")

    assert response.status_code == 500
    assert response.json["type"] == "about:blank"
    assert "Retry-After" not in response.headers


@pytest.mark.parametrize("name", UNREACHABLE)
def test_database_errors_outside_flask_become_the_same_problem(name):
    with pytest.raises(DatabaseUnavailable) as raised, database_errors():
        raise _database_errors()[name]

    assert (raised.value.status, raised.value.slug) == (503, "database-unavailable")
    assert raised.value.headers == {"Retry-After": "5"}


def test_database_errors_lets_other_errors_through_unchanged():
    error = _database_errors()["duplicate"]

    with pytest.raises(type(error)) as raised, database_errors():
        raise error

    assert raised.value is error
