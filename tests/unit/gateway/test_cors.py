"""CORS on a route and on the gateway's own API: preflights answered before authentication and
never sent upstream, an allowed origin's answers readable (errors included), a disallowed
origin's not, and the route file's mistakes named."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.gateway.cors import Cors
from tests.factories import Identity

PAGE = "https://app.example.com"


@pytest.fixture
def app(make_app, upstream):
    return make_app(
        routes=f"""
upstreams:
  bin:
    targets: ["{upstream.url}"]
routes:
  - path: /orders
    upstream: bin
    strip_prefix: true
    auth: required
    methods: [GET, POST]
    cors:
      origins: ["{PAGE}", "https://*.shop.example"]
      credentials: true
      max_age: 300
  - path: /open
    upstream: bin
    strip_prefix: true
    auth: none
    cors: {{origins: ["*"], headers: ["*"]}}
  - path: /plain
    upstream: bin
    strip_prefix: true
    auth: none
""",
        API_CORS_ORIGINS=[PAGE],
    )


def preflight(client, path: str, origin: str = PAGE, method: str = "POST", asked_headers: str = "X-API-Key, Content-Type"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": asked_headers})


def test_a_preflight_is_answered_before_authentication_and_never_reaches_the_upstream(app, upstream):
    response = preflight(app.test_client(), "/orders/anything/1")
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["Access-Control-Allow-Methods"] == "GET, POST, HEAD"  # the route's methods, HEAD with GET
    assert {name.strip().lower() for name in response.headers["Access-Control-Allow-Headers"].split(",")} >= {"x-api-key", "content-type", "authorization"}
    assert response.headers["Access-Control-Max-Age"] == "300"
    assert "Origin" in response.headers["Vary"]
    assert response.data == b""
    assert upstream.hits("/anything/1") == 0


@pytest.mark.parametrize("origin", ["https://a.shop.example", "https://b.c.shop.example"])
def test_an_origin_pattern_takes_any_subdomain(app, origin):
    response = preflight(app.test_client(), "/orders/anything/1", origin=origin)
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == origin


@pytest.mark.parametrize("origin", ["https://evil.example", "https://shop.example", "http://app.example.com", "https://app.example.com.evil.example"])
def test_a_preflight_from_another_origin_is_refused_without_a_cors_field(app, upstream, origin):
    response = preflight(app.test_client(), "/orders/anything/1", origin=origin)
    assert response.status_code == 403
    assert response.content_type == "application/problem+json"
    assert response.json["type"].endswith("/cors-origin-refused")
    assert not [name for name in response.headers.keys() if name.lower().startswith("access-control-")]  # noqa: SIM118
    assert upstream.hits("/anything/1") == 0


def test_an_allowed_origin_reads_the_answer_and_its_rate_limit_and_request_id_fields(app, upstream):
    key = Identity(app).key()
    # httpbin answers with CORS fields of its own (for any origin), and this Vary.
    response = app.test_client().get("/orders/response-headers?Vary=Accept-Encoding", headers={"Origin": PAGE, "X-API-Key": key})
    assert response.status_code == 200
    assert upstream.hits("/response-headers") == 1
    assert response.headers.getlist("Access-Control-Allow-Origin") == [PAGE]  # the upstream's replaced
    assert response.headers.getlist("Access-Control-Allow-Credentials") == ["true"]
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    exposed = {name.strip() for name in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"RateLimit", "RateLimit-Policy", "X-Request-ID", "Retry-After"} <= exposed
    assert response.headers["Vary"] == "Accept-Encoding, Origin"


def test_an_error_is_readable_by_an_allowed_origin_too(app):
    response = app.test_client().get("/orders/anything/1", headers={"Origin": PAGE})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == PAGE


def test_another_origin_gets_the_answer_without_cors_fields(app, upstream):
    key = Identity(app).key()
    response = app.test_client().get("/orders/anything/1", headers={"Origin": "https://evil.example", "X-API-Key": key})
    assert response.status_code == 200
    assert not [name for name in response.headers.keys() if name.lower().startswith("access-control-")]  # noqa: SIM118
    assert "Origin" in response.headers["Vary"]


def test_any_origin_without_credentials_is_a_star_and_asked_headers_are_reflected(app):
    client = app.test_client()
    answered = preflight(client, "/open/anything", origin="https://any.example", asked_headers="X-Custom, Content-Type")
    assert answered.status_code == 204
    assert answered.headers["Access-Control-Allow-Origin"] == "*"
    assert answered.headers["Access-Control-Allow-Headers"] == "X-Custom, Content-Type"
    assert "Access-Control-Allow-Credentials" not in answered.headers
    assert client.get("/open/anything", headers={"Origin": "https://any.example"}).headers["Access-Control-Allow-Origin"] == "*"


def test_a_route_without_cors_passes_an_options_request_to_its_upstream(app, upstream):
    response = preflight(app.test_client(), "/plain/anything/x")
    assert upstream.hits("/anything/x") == 1
    assert "TRACE" in response.headers["Allow"]  # httpbin's answer, its own CORS fields and all


def test_the_gateway_api_answers_a_preflight_with_the_methods_of_the_path(app):
    response = preflight(app.test_client(), "/_gateway/keys", method="POST")
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == PAGE
    assert set(response.headers["Access-Control-Allow-Methods"].split(", ")) == {"GET", "HEAD", "POST"}


def test_the_gateway_api_lets_an_allowed_origin_read_its_answers_and_problems(app):
    client = app.test_client()
    refused = client.get("/_gateway/keys", headers={"Origin": PAGE})
    assert refused.status_code == 401
    assert refused.headers["Access-Control-Allow-Origin"] == PAGE
    assert "Location" in refused.headers["Access-Control-Expose-Headers"]
    other = client.get("/_gateway/keys", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    assert preflight(client, "/_gateway/keys", origin="https://evil.example").status_code == 403


def test_without_api_origins_the_gateway_api_has_no_cors(make_app):
    client = make_app().test_client()
    assert "Access-Control-Allow-Origin" not in client.get("/_gateway/openapi.json", headers={"Origin": PAGE}).headers


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"origins": ["app.example.com"]}, "is not an origin"),
        ({"origins": ["https://app.example.com/path"]}, "is not an origin"),
        ({"origins": ["*"], "credentials": True}, "cannot go with credentials"),
        ({"origins": []}, "at least 1"),
        ({"origins": [PAGE], "headers": ["X Bad"]}, "not a header field name"),
        ({"origins": [PAGE], "max_age": -1}, "greater than or equal to 0"),
    ],
)
def test_a_cors_section_that_cannot_work_is_refused_with_the_reason(section, message):
    with pytest.raises(ValidationError, match=message):
        Cors(**section)


def test_api_origins_come_from_the_environment_comma_separated(make_app):
    client = make_app(API_CORS_ORIGINS=f"{PAGE}, https://other.example").test_client()
    for origin in (PAGE, "https://other.example"):
        assert preflight(client, "/_gateway/keys", origin=origin).headers["Access-Control-Allow-Origin"] == origin
