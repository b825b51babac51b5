"""``DELETE /_gateway/admin/cache``: an admin purges cached answers by key, route or path prefix,
with the in-process store and with Redis."""
from __future__ import annotations

import pytest

from tests.unit.api.support import auth
from tests.unit.jobs.support import upstream_server

PURGE = "/_gateway/admin/cache"
HIT = "frontdoor; hit"
MISS = "frontdoor; fwd=miss; stored"


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def app(make_app, request):
    """Two cached routes to httpbin: ``/users`` (unnamed: its label is its path) and ``/orders``
    (named ``orders``); entries in the process, or in Redis under the app's own KEY_PREFIX."""
    config = {"REDIS_URL": request.getfixturevalue("redis_url")} if request.param == "redis" else {}
    return make_app(
        routes=f"""
upstreams:
  bin:
    targets: ["{upstream_server().url}"]
routes:
  - path: /users
    upstream: bin
    strip_prefix: true
    cache: {{ttl: 60}}
  - path: /orders
    name: orders
    upstream: bin
    strip_prefix: true
    cache: {{ttl: 60}}
""",
        **config,
    )


def cache_status(client, path: str, headers: dict[str, str] | None = None) -> str:
    response = client.get(path, headers=headers or {})
    assert response.status_code == 200, response.data
    return response.headers["Cache-Status"]


def prime(client, *paths: str, headers: dict[str, str] | None = None) -> None:
    """Store an answer for each path, and check it is now served from the cache."""
    for path in paths:
        cache_status(client, path, headers)
        assert cache_status(client, path, headers).startswith(HIT), path


def test_an_anonymous_caller_is_a_401_and_nothing_is_purged(client):
    prime(client, "/users/anything/1")

    response = client.delete(f"{PURGE}?key=/users/anything/1")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="frontdoor"'
    assert cache_status(client, "/users/anything/1").startswith(HIT)


def test_a_consumer_without_the_admin_scope_is_a_403_and_nothing_is_purged(client, identity):
    prime(client, "/users/anything/1")

    response = client.delete(f"{PURGE}?prefix=/", headers=auth(identity.key(scopes=("orders:read",))))

    assert response.status_code == 403
    assert 'scope="admin"' in response.headers["WWW-Authenticate"]
    assert cache_status(client, "/users/anything/1").startswith(HIT)


@pytest.mark.parametrize(
    "query",
    ["", "?key=", "?key=/users/anything/1&route=/users", "?route=/users&prefix=/users", "?key=/a&route=/users&prefix=/a", "?path=/users"],
)
def test_not_exactly_one_of_key_route_and_prefix_is_a_400(client, admin, query):
    prime(client, "/users/anything/1")

    response = client.delete(f"{PURGE}{query}", headers=admin)

    assert response.status_code == 400
    assert response.content_type == "application/problem+json"
    assert "exactly one of key, route and prefix" in response.json["detail"]
    assert cache_status(client, "/users/anything/1").startswith(HIT)


@pytest.mark.parametrize("query", ["?key=users/anything/1", "?prefix=users"])
def test_a_key_or_prefix_that_is_not_a_path_is_a_400(client, admin, query):
    response = client.delete(f"{PURGE}{query}", headers=admin)

    assert response.status_code == 400
    assert "must be a path starting with '/'" in response.json["detail"]


def test_purge_by_key_removes_that_url_for_every_consumer_and_nothing_else(client, admin, identity):
    consumer = auth(identity.key(scopes=("orders:read",)))
    target, other_query, no_query, other_route = "/users/anything/1?a=1&b=2", "/users/anything/1?a=2", "/users/anything/1", "/orders/anything/1?a=1&b=2"
    prime(client, target, other_query, no_query, other_route)
    prime(client, target, headers=consumer)

    response = client.delete(f"{PURGE}?key=/users/anything/1%3Fb%3D2%26a%3D1", headers=admin)  # the query in any order

    assert response.status_code == 200
    assert response.json == {"deleted": 4}  # two consumers' entries, each with its Vary record
    assert cache_status(client, target) == MISS
    assert cache_status(client, target, consumer) == MISS
    for kept in (other_query, no_query, other_route):
        assert cache_status(client, kept).startswith(HIT), kept


def test_purge_by_the_key_of_a_url_without_query_leaves_its_queries(client, admin):
    prime(client, "/users/anything/1", "/users/anything/1?a=1")

    assert client.delete(f"{PURGE}?key=/users/anything/1", headers=admin).json == {"deleted": 2}

    assert cache_status(client, "/users/anything/1") == MISS
    assert cache_status(client, "/users/anything/1?a=1").startswith(HIT)


def test_purge_by_route_removes_only_that_routes_entries(client, admin):
    prime(client, "/orders/anything/1", "/orders/anything/2?x=1", "/users/anything/1")

    response = client.delete(f"{PURGE}?route=orders", headers=admin)

    assert response.json == {"deleted": 4}
    assert cache_status(client, "/orders/anything/1") == MISS
    assert cache_status(client, "/orders/anything/2?x=1") == MISS
    assert cache_status(client, "/users/anything/1").startswith(HIT)


def test_purge_by_route_takes_an_unnamed_routes_path(client, admin):
    prime(client, "/users/anything/1", "/orders/anything/1")

    assert client.delete(f"{PURGE}?route=/users", headers=admin).json == {"deleted": 2}

    assert cache_status(client, "/users/anything/1") == MISS
    assert cache_status(client, "/orders/anything/1").startswith(HIT)


def test_purge_by_prefix_removes_every_url_under_the_path(client, admin):
    prime(client, "/users/anything/a", "/users/anything/a/b?x=1", "/users/anything/b", "/orders/anything/a")

    response = client.delete(f"{PURGE}?prefix=/users/anything/a", headers=admin)

    assert response.json == {"deleted": 4}
    assert cache_status(client, "/users/anything/a") == MISS
    assert cache_status(client, "/users/anything/a/b?x=1") == MISS
    assert cache_status(client, "/users/anything/b").startswith(HIT)
    assert cache_status(client, "/orders/anything/a").startswith(HIT)


@pytest.mark.parametrize("query", ["?key=/users/anything/%2A", "?key=/users/anything/%3F", "?prefix=/users/anything/%5B12%5D", "?route=%2A"])
def test_glob_characters_in_what_is_purged_match_only_themselves(client, admin, query):
    prime(client, "/users/anything/1", "/users/anything/2")

    response = client.delete(f"{PURGE}{query}", headers=admin)

    assert response.json == {"deleted": 0}
    assert cache_status(client, "/users/anything/1").startswith(HIT)
    assert cache_status(client, "/users/anything/2").startswith(HIT)


def test_purging_what_is_not_cached_deletes_nothing(client, admin):
    response = client.delete(f"{PURGE}?prefix=/nowhere", headers=admin)

    assert response.status_code == 200
    assert response.json == {"deleted": 0}


def test_purge_by_prefix_stops_at_segment_boundaries(client, admin):
    prime(client, "/users/anything/a", "/users/anything/ab")

    client.delete(f"{PURGE}?prefix=/users/anything/a", headers=admin)

    assert cache_status(client, "/users/anything/ab").startswith(HIT)


def test_purge_by_route_takes_a_named_routes_path(client, admin):
    prime(client, "/orders/anything/1")

    response = client.delete(f"{PURGE}?route=/orders", headers=admin)

    assert response.json == {"deleted": 2}
    assert cache_status(client, "/orders/anything/1") == MISS
