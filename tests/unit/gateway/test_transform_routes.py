"""Header rules, JSON field rules and header-based routing through the app, against httpbin."""
from __future__ import annotations

import pytest

from tests.unit.jobs.support import upstream_server


@pytest.fixture
def client(make_app):
    upstream = upstream_server()
    app = make_app(
        routes=f"""
upstreams:
  bin:
    targets: ["{upstream.url}"]
routes:
  - path: /users
    upstream: bin
    strip_prefix: true
    request_headers: {{remove: [X-Debug], rename: {{X-Client-Tag: X-Tag}}, add: {{X-From: gateway}}}}
    response_headers: {{remove: [Access-Control-Allow-Credentials], add: {{X-Filtered: "yes"}}}}
    response_body: {{deny: [origin, headers.X-Forwarded-For], rename: {{url: link}}}}
  - path: /svc
    upstream: bin
    strip_prefix: true
    request_headers: {{add: {{X-Backend: stable}}}}
  - path: /svc
    upstream: bin
    strip_prefix: true
    match_headers: {{X-Version: v2}}
    request_headers: {{add: {{X-Backend: canary}}}}
""",
    )
    return app.test_client()


def test_a_route_rewrites_headers_both_ways_and_filters_json_fields(client):
    response = client.get("/users/anything?q=1", headers={"X-Debug": "1", "X-Client-Tag": "t", "Accept-Encoding": "gzip"})

    assert response.status_code == 200
    echoed = response.json
    assert "origin" not in echoed and "X-Forwarded-For" not in echoed["headers"]
    assert echoed["link"].endswith("/anything?q=1") and "url" not in echoed
    assert echoed["headers"]["X-From"] == "gateway"
    assert echoed["headers"]["X-Tag"] == "t"
    assert "X-Debug" not in echoed["headers"] and "X-Client-Tag" not in echoed["headers"]
    assert echoed["headers"]["Accept-Encoding"] == "identity"
    assert response.headers["X-Filtered"] == "yes"
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert int(response.headers["Content-Length"]) == len(response.data)


def test_non_json_answers_pass_through_a_filtering_route(client):
    response = client.get("/users/robots.txt")

    assert response.status_code == 200
    assert response.data.startswith(b"User-agent")


def test_a_header_picks_the_canary_route_on_one_path(client):
    assert client.get("/svc/headers").json["headers"]["X-Backend"] == "stable"
    assert client.get("/svc/headers", headers={"X-Version": "v2"}).json["headers"]["X-Backend"] == "canary"
    assert client.get("/svc/headers", headers={"X-Version": "v3"}).json["headers"]["X-Backend"] == "stable"
