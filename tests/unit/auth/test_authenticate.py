"""Per-route authentication over HTTP: every outcome a caller can meet, and how fast a revocation bites."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from werkzeug.datastructures import Headers

from app.auth import manage
from app.auth.authenticate import credential_of
from app.models.base import utcnow
from tests.factories import Identity
from tests.unit.auth.support import ROUTES, change_key, database_down, key_id, received

UNKNOWN_KEY = "fd_live_" + "A" * 40
INVALID_CHALLENGE = (
    'Bearer realm="frontdoor", error="invalid_token", error_description="The credentials are not valid"'
)


def without_request_id(body: dict) -> dict:
    return {name: value for name, value in body.items() if name != "request_id"}


CACHE_TTL = 1.0  # seconds: AUTH_CACHE_TTL in the tests of changes made by another process


def assert_refused_only_after_the_ttl(client, headers: dict[str, str]) -> None:
    """A change made behind this process's back: still let in from the cache, refused once
    AUTH_CACHE_TTL has passed. Only the change itself (one UPDATE) may come between the request
    that filled the cache and this one."""
    still_cached = client.get("/private", headers=headers)
    time.sleep(CACHE_TTL + 0.1)
    after_ttl = client.get("/private", headers=headers)

    assert still_cached.status_code == 200
    assert after_ttl.status_code == 401
    assert after_ttl.headers["WWW-Authenticate"] == INVALID_CHALLENGE


def test_no_credential_on_a_required_route_is_a_401_challenge(client, upstream):
    response = client.get("/private", headers={"X-Request-ID": "req-1"})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="frontdoor"'
    assert response.content_type == "application/problem+json"
    assert response.json == {
        "type": "/_gateway/problems/unauthenticated",
        "title": "Unauthorized",
        "status": 401,
        "detail": "Credentials are required: send 'Authorization: Bearer <key or token>' or 'X-API-Key: <key>'",
        "request_id": "req-1",
    }
    assert len(upstream.calls) == 0


def _bad_key(kind: str, app, identity: Identity) -> str:
    """A key that once was, or looks, valid: the gateway must answer it as it answers UNKNOWN_KEY."""
    if kind == "revoked":
        key = identity.key()
        change_key(app, key, revoked_at=utcnow())
        return key
    if kind == "expired":
        key = identity.key(expires_in=3600)
        change_key(app, key, expires_at=utcnow() - timedelta(seconds=1))
        return key
    if kind == "disabled consumer":
        return identity.key(identity.consumer(disabled=True))
    assert kind == "not a key"
    return "letmein"


@pytest.mark.parametrize("kind", ["revoked", "expired", "disabled consumer", "not a key"])
@pytest.mark.parametrize("send", ["X-API-Key", "Bearer"])
def test_every_bad_key_gets_the_same_401_as_an_unknown_one(app, client, identity, upstream, kind, send):
    def call(key: str):
        headers = {"X-API-Key": key} if send == "X-API-Key" else {"Authorization": f"Bearer {key}"}
        return client.get("/private", headers=headers)

    unknown = call(UNKNOWN_KEY)
    response = call(_bad_key(kind, app, identity))

    assert (unknown.status_code, response.status_code) == (401, 401)
    assert unknown.headers["WWW-Authenticate"] == response.headers["WWW-Authenticate"] == INVALID_CHALLENGE
    assert without_request_id(response.json) == without_request_id(unknown.json)
    assert response.json["request_id"] == response.headers["X-Request-ID"]
    assert response.json["detail"] == "The credentials are not valid"
    assert len(upstream.calls) == 0


def test_a_key_that_expires_by_itself_is_refused(client, identity, upstream):
    key = identity.key(expires_in=0.05)
    time.sleep(0.06)

    response = client.get("/private", headers={"X-API-Key": key})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == INVALID_CHALLENGE


def test_a_credential_without_a_route_scope_is_a_403_naming_the_scope(client, identity, upstream):
    key = identity.key(scopes=("orders:write",))

    response = client.get("/orders", headers={"X-API-Key": key})

    assert response.status_code == 403
    assert response.headers["WWW-Authenticate"] == (
        'Bearer realm="frontdoor", error="insufficient_scope", scope="orders:read"'
    )
    assert response.json["type"] == "/_gateway/problems/insufficient-scope"
    assert response.json["status"] == 403
    assert "orders:read" in response.json["detail"]
    assert len(upstream.calls) == 0


def test_a_credential_with_the_route_scope_is_proxied(client, identity, upstream):
    key = identity.key(scopes=("orders:read",))

    response = client.get("/orders", headers={"X-API-Key": key})

    assert response.status_code == 200
    assert response.data == b"up"


@pytest.mark.parametrize("send", ["X-API-Key", "Bearer", "bearer"])
def test_a_valid_key_is_accepted_in_either_header(client, identity, upstream, send):
    consumer = identity.consumer("acme")
    key = identity.key(consumer)
    headers = {"X-API-Key": key} if send == "X-API-Key" else {"Authorization": f"{send} {key}"}

    response = client.get("/private/things", headers=headers)

    assert response.status_code == 200
    assert received(upstream)["X-Consumer-ID"] == consumer
    assert upstream.calls[-1].url == f"{upstream.url}/private/things"


def test_optional_auth_without_a_credential_is_proxied_anonymously(client, upstream):
    response = client.get("/maybe")

    assert response.status_code == 200
    assert "X-Consumer-ID" not in received(upstream)


def test_optional_auth_with_a_credential_identifies_the_consumer(client, identity, upstream):
    consumer = identity.consumer()

    response = client.get("/maybe", headers={"X-API-Key": identity.key(consumer)})

    assert response.status_code == 200
    assert received(upstream)["X-Consumer-ID"] == consumer


def test_optional_auth_with_a_bad_credential_is_a_401(client, identity, upstream):
    response = client.get("/maybe", headers={"Authorization": f"Bearer {UNKNOWN_KEY}"})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == INVALID_CHALLENGE
    assert len(upstream.calls) == 0


def test_auth_none_does_not_inspect_credentials_and_passes_them_on(client, upstream):
    response = client.get("/open", headers={"X-API-Key": UNKNOWN_KEY, "Authorization": "Bearer not.a.jwt"})

    assert response.status_code == 200
    seen = received(upstream)
    assert seen["X-API-Key"] == UNKNOWN_KEY
    assert seen["Authorization"] == "Bearer not.a.jwt"
    assert "X-Consumer-ID" not in seen


def test_a_scheme_other_than_bearer_counts_as_no_credential(client, upstream):
    response = client.get("/private", headers={"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"})

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="frontdoor"'


def test_the_gateways_own_api_requires_a_credential_and_health_does_not(client):
    assert client.get("/_gateway/keys").status_code == 401
    assert client.get("/healthz").status_code == 200


def test_a_key_that_cannot_be_checked_is_a_503_not_a_401(client, upstream):
    # No tables: the database answers every query with an error, as when it is unreachable.
    response = client.get("/private", headers={"X-API-Key": UNKNOWN_KEY})

    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert response.json["type"] == "/_gateway/problems/database-unavailable"
    assert len(upstream.calls) == 0


def _verified_key(make_app, **config):
    """An app (AUTH_CACHE_TTL 5 s, AUTH_CACHE_STALE 60 s unless ``config`` says otherwise) and a
    key it has just let in."""
    app = make_app(routes=ROUTES, **{"AUTH_CACHE_TTL": 5, "AUTH_CACHE_STALE": 60, **config})
    headers = {"X-API-Key": Identity(app).key()}
    client = app.test_client()
    assert client.get("/private", headers=headers).status_code == 200
    return app, client, headers


def test_while_the_database_is_down_a_key_verified_within_the_stale_window_still_gets_in(make_app, upstream, clock):
    app, client, headers = _verified_key(make_app)

    with database_down(app):
        clock.advance(59)
        response = client.get("/private", headers=headers)

    assert response.status_code == 200
    assert response.data == b"up"
    assert received(upstream)["X-Consumer-ID"]


def test_past_the_stale_window_a_key_is_a_503_database_unavailable(make_app, upstream, clock):
    app, client, headers = _verified_key(make_app)

    with database_down(app):
        clock.advance(30)
        within = client.get("/private", headers=headers)
        clock.advance(30)
        past = client.get("/private", headers=headers)

    assert within.status_code == 200
    assert past.status_code == 503
    assert past.content_type == "application/problem+json"
    assert past.json["type"] == "/_gateway/problems/database-unavailable"
    assert past.json["title"] == "Service Unavailable"
    assert past.headers["Retry-After"] == "5"
    assert len(upstream.calls) == 2  # the request that verified the key, and the one within


def test_with_the_database_down_a_key_never_verified_is_a_503_not_a_401(make_app, upstream, clock):
    app, client, _ = _verified_key(make_app)
    other = Identity(app).key()

    with database_down(app):
        response = client.get("/private", headers={"X-API-Key": other})

    assert response.status_code == 503
    assert response.json["type"] == "/_gateway/problems/database-unavailable"


def test_once_the_database_is_back_keys_are_checked_again_without_a_restart(make_app, upstream, clock):
    app, client, headers = _verified_key(make_app)
    with database_down(app):
        clock.advance(61)
        assert client.get("/private", headers=headers).status_code == 503
    change_key(app, headers["X-API-Key"], revoked_at=utcnow())
    clock.advance(1)  # a process asks the database again at most once a second after a failure

    assert client.get("/private", headers=headers).status_code == 401


def test_the_gateways_own_api_is_a_503_while_the_database_is_down_even_for_a_verified_key(make_app, upstream, clock):
    app, client, headers = _verified_key(make_app)

    with database_down(app):
        response = client.get("/_gateway/keys", headers=headers)

    assert response.status_code == 503
    assert response.json["type"] == "/_gateway/problems/database-unavailable"
    assert response.headers["Retry-After"] == "5"


def test_a_key_revoked_by_another_process_is_refused_once_the_cache_ttl_passes(make_app, upstream):
    app = make_app(routes=ROUTES, AUTH_CACHE_TTL=CACHE_TTL)
    key = Identity(app).key()
    client = app.test_client()
    headers = {"X-API-Key": key}
    assert client.get("/private", headers=headers).status_code == 200

    change_key(app, key, revoked_at=utcnow())

    assert_refused_only_after_the_ttl(client, headers)


def test_a_key_revoked_through_the_api_is_refused_at_once_in_this_process(client, identity, upstream):
    key = identity.key()
    headers = {"X-API-Key": key}
    assert client.get("/private", headers=headers).status_code == 200  # now cached for AUTH_CACHE_TTL (5 s)

    revoked = client.delete(f"/_gateway/keys/{key_id(client, key)}", headers=headers)

    assert revoked.status_code == 200
    assert revoked.json["status"] == "revoked"
    assert client.get("/private", headers=headers).status_code == 401


def test_a_consumer_disabled_by_another_process_is_refused_once_the_cache_ttl_passes(make_app, upstream):
    app = make_app(routes=ROUTES, AUTH_CACHE_TTL=CACHE_TTL)
    identity = Identity(app)
    key = identity.key(identity.consumer("acme"))
    client = app.test_client()
    headers = {"X-API-Key": key}
    other_process = make_app(routes=ROUTES)  # the same database, a cache of its own
    assert client.get("/private", headers=headers).status_code == 200

    with other_process.app_context():
        manage.update_consumer(manage.find_consumer("acme"), disabled=True)

    assert_refused_only_after_the_ttl(client, headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"X-API-Key": "fd_live_a", "Authorization": "Bearer fd_live_b"}, "fd_live_a"),
        ({"Authorization": "Bearer fd_live_b"}, "fd_live_b"),
        ({"Authorization": "bearer   fd_live_b  "}, "fd_live_b"),
        ({"X-API-Key": "  fd_live_a "}, "fd_live_a"),
        ({"X-API-Key": "", "Authorization": "Bearer fd_live_b"}, "fd_live_b"),
        ({"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"}, None),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "Bearer   "}, None),
        ({"Authorization": "fd_live_b"}, None),
        ({}, None),
    ],
)
def test_credential_of_prefers_x_api_key_and_reads_only_bearer(headers, expected):
    assert credential_of(Headers(headers)) == expected
