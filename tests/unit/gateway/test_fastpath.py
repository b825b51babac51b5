"""The cache fast path: public hits answered in front of the app, exactly as the app answers them."""
from __future__ import annotations

import json

import pytest

from app.gateway.fastpath import CacheFastPath
from tests.services import logged

ROUTES = """
upstreams:
  bin:
    targets: ["{url}"]
routes:
  - path: /public
    upstream: bin
    strip_prefix: true
    cache: {{ttl: 60, public: true}}
  - path: /mine
    upstream: bin
    strip_prefix: true
    cache: {{ttl: 60}}
  - path: /limited
    upstream: bin
    strip_prefix: true
    rate_limit: "100/minute"
    cache: {{ttl: 60, public: true}}
  - path: /members
    upstream: bin
    strip_prefix: true
    auth: required
    cache: {{ttl: 60, public: true}}
"""


@pytest.fixture
def gateway(make_app, upstream):
    def build(**config):
        app = make_app(ROUTES.format(url=upstream.url), **config)
        return app, app.test_client()

    return build


class Counting:
    """Wraps the app behind the fast path, counting the requests that reach it."""

    def __init__(self, app):
        self.inner, self.calls = app.wsgi_app.wsgi_app, 0
        app.wsgi_app.wsgi_app = self

    def __call__(self, environ, start_response):
        self.calls += 1
        return self.inner(environ, start_response)


def _comparable(response) -> tuple:
    drop = {"x-request-id", "date"}
    return response.status_code, sorted((k, v) for k, v in response.headers.items() if k.lower() not in drop), response.data


def test_a_public_hit_is_answered_before_the_app_exactly_as_the_app_answers_it(gateway, upstream):
    app, client = gateway()
    assert isinstance(app.wsgi_app, CacheFastPath)
    counting = Counting(app)
    first = client.get("/public/anything/x?b=2&a=1")
    assert "fwd=miss" in first.headers["Cache-Status"]
    fast_path = app.wsgi_app

    with logged("frontdoor.access") as log:
        hit = client.get("/public/anything/x?a=1&b=2", headers={"X-Request-ID": "fast-1"})
        app.wsgi_app = fast_path.wsgi_app  # the same hit, through the app's hooks
        through_app = client.get("/public/anything/x?a=1&b=2", headers={"X-Request-ID": "slow-1"})
        hit.close()  # the access line is written once the body has been sent
        through_app.close()

    assert counting.calls == 2  # the miss and the one sent around the fast path on purpose
    assert upstream.hits("/anything/x") == 1
    assert _comparable(hit) == _comparable(through_app)
    assert "frontdoor; hit; ttl=" in hit.headers["Cache-Status"]
    assert hit.headers["X-Request-ID"] == "fast-1"
    lines = {r.request_id: r for r in log.messages("request")}
    fast, slow = lines["fast-1"], lines["slow-1"]
    for field in ("method", "path", "route", "consumer", "target", "status", "upstream_ms"):
        assert getattr(fast, field) == getattr(slow, field), field
    assert fast.duration_ms >= 0


def test_head_hits_have_no_body_and_generated_request_ids(gateway):
    app, client = gateway()
    client.get("/public/anything/h")
    counting = Counting(app)

    head = client.head("/public/anything/h", headers={"X-Request-ID": "bad id with spaces"})

    assert counting.calls == 0
    assert head.status_code == 200 and head.data == b""
    assert "hit" in head.headers["Cache-Status"]
    assert len(head.headers["X-Request-ID"]) == 32 and " " not in head.headers["X-Request-ID"]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/mine/anything/p", {}),  # per-consumer entries: the consumer is known only after auth
        ("/limited/anything/p", {}),  # a rate limit applies
        ("/public/anything/p", {"X-API-Key": "fd_live_whatever"}),  # a credential to check (401 if bad)
        ("/public/anything/p", {"Authorization": "Bearer x"}),
        ("/public/anything/p", {"Cache-Control": "no-cache"}),  # the client asks to revalidate
    ],
)
def test_what_the_hooks_could_change_goes_to_the_app(gateway, identity, path, headers):
    app, client = gateway()
    client.get(path)  # warm (anonymous callers have entries of their own on /mine)
    counting = Counting(app)

    response = client.get(path, headers=headers)

    assert counting.calls == 1
    if "X-API-Key" in headers or "Authorization" in headers:
        assert response.status_code == 401  # the fast path never hides a bad credential


def test_a_default_limit_keeps_every_request_in_the_app(gateway):
    app, client = gateway(RATELIMIT_DEFAULT="1000/minute")
    client.get("/public/anything/d")

    assert not isinstance(app.wsgi_app, CacheFastPath)
    hit = client.get("/public/anything/d")
    assert "hit" in hit.headers["Cache-Status"]
    assert "RateLimit-Policy" in hit.headers  # counted: the limiter's hooks ran
    assert client.get("/members/anything/d").status_code == 401


def test_no_qualifying_route_means_no_fast_path(make_app, upstream):
    app = make_app(ROUTES.format(url=upstream.url), RATELIMIT_PLANS={"anonymous": "10/minute"}, RATELIMIT_DEFAULT="5/minute")
    assert not isinstance(app.wsgi_app, CacheFastPath)


def test_misses_reserved_paths_and_unknown_paths_go_to_the_app(gateway):
    app, client = gateway()
    counting = Counting(app)

    assert client.get("/public/anything/m").status_code == 200  # a miss
    assert client.get("/healthz").status_code == 200
    assert client.get("/nowhere").status_code == 404
    assert client.get("/public/../healthz").status_code in (400, 404)
    assert counting.calls == 4


def test_behind_trusted_proxies_the_forwarded_host_keys_the_hit(gateway):
    _, client = gateway(TRUSTED_PROXY_HOPS=1)
    client.get("/public/anything/f", headers={"X-Forwarded-Host": "one.example"})

    other = client.get("/public/anything/f", headers={"X-Forwarded-Host": "two.example"})
    same = client.get("/public/anything/f", headers={"X-Forwarded-Host": "one.example"})

    assert "fwd=miss" in other.headers["Cache-Status"]  # another host: another entry
    assert "hit" in same.headers["Cache-Status"]
    body = json.loads(same.data)
    assert body["headers"]["X-Forwarded-Host"] == "one.example"


def test_a_miss_is_matched_to_its_route_once_not_again_by_the_app(gateway, monkeypatch):
    app, client = gateway()
    router = app.extensions["gateway"].router
    matched = []
    original = router.match
    monkeypatch.setattr(router, "match", lambda *args: matched.append(args[1]) or original(*args))

    miss = client.get("/public/anything/once")
    hit = client.get("/public/anything/once")

    assert "fwd=miss" in miss.headers["Cache-Status"] and "hit" in hit.headers["Cache-Status"]
    assert matched == ["/public/anything/once", "/public/anything/once"]  # one match per request
