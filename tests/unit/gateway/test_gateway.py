"""The proxy view: what reaches a route, what the gateway keeps for itself, what it refuses."""
from __future__ import annotations

import json
import re

import pytest

from tests.stub_upstream import StubUpstream


def catch_all(upstream_url: str) -> str:
    """A route file with a catch-all route, a prefix-stripping one and a GET-only one."""
    return f"""
upstreams:
  site:
    targets: ["{upstream_url}"]
routes:
  - path: /
    upstream: site
  - path: /public
    upstream: site
    strip_prefix: true
  - path: /read-only
    upstream: site
    methods: [GET]
"""


@pytest.fixture
def upstream():
    with StubUpstream() as stub:
        stub.add("GET", re.compile("/.*"), body=b"up")
        yield stub


@pytest.fixture
def client(make_app, upstream):
    return make_app(routes=catch_all(upstream.url)).test_client()


@pytest.mark.parametrize("path", ["/_gateway", "/_gateway/", "/_gateway/nothing", "/metrics/x", "/healthz/", "/readyz/x"])
def test_the_gateway_keeps_its_own_paths_even_with_a_catch_all_route(client, upstream, path):
    response = client.get(path)
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    assert len(upstream.calls) == 0


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/_gateway/jobs/job_x", "DELETE, GET, HEAD, OPTIONS"),
        ("PATCH", "/healthz", "GET, HEAD, OPTIONS"),
        ("DELETE", "/metrics", "GET, HEAD, OPTIONS"),
        ("POST", "/_gateway/admin/routes", "GET, HEAD, OPTIONS"),
    ],
)
def test_a_method_the_gateways_own_path_does_not_take_is_a_405_naming_those_it_does(client, upstream, method, path, allowed):
    # Not proxied to the catch-all route, and not a 404: the resource is there (RFC 9110 15.5.6).
    response = client.open(path, method=method)
    assert response.status_code == 405
    assert response.headers["Allow"] == allowed
    assert response.headers["Content-Type"] == "application/problem+json"
    assert len(upstream.calls) == 0

    assert client.open("/_gateway/nothing", method=method).status_code == 404


def test_paths_that_only_start_like_a_reserved_one_are_proxied(client, upstream):
    response = client.get("/healthzx")
    assert response.status_code == 200 and response.data == b"up"
    assert upstream.calls[0].url == f"{upstream.url}/healthzx"


@pytest.mark.parametrize("path", ["/public/../read-only", "/public/./x", "/public/%2e%2e/read-only", "/.."])
def test_dot_segments_are_refused_before_routing(client, upstream, path):
    response = client.delete(path)
    assert response.status_code == 400
    assert response.json["detail"] == "The path must not contain '.' or '..' segments"
    assert len(upstream.calls) == 0


def test_an_absolute_form_target_is_routed_and_sent_by_its_path(client, upstream):
    response = client.get("/public/items?x=1", environ_overrides={"RAW_URI": "http://gateway.example/public/items?x=1"})
    assert response.status_code == 200
    assert upstream.calls[0].url == f"{upstream.url}/items?x=1"


def test_the_upstreams_date_and_server_give_way_to_the_gateways(client, upstream):
    upstream.replace(
        "GET",
        re.compile("/.*"),
        body=b"up",
        headers={"Date": "Thu, 01 Jan 1970 00:00:00 GMT", "Server": "backend/1.0"},
    )
    response = client.get("/anything")
    assert "Server" not in response.headers and "Date" not in response.headers
    assert response.headers["Via"] == "1.1 frontdoor"


def _forwarded_as_seen_upstream(make_app, hops: int, host_hops: int = 0) -> dict:
    with StubUpstream() as upstream:
        upstream.add("GET", "/items", body=b"ok")
        app = make_app(routes=catch_all(upstream.url), TRUSTED_PROXY_HOPS=hops, TRUSTED_FORWARDED_HOST_HOPS=host_hops)
        app.test_client().get(
            "/items",
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example", "X-Forwarded-For": "203.0.113.7"},
            environ_overrides={"REMOTE_ADDR": "10.1.2.3"},
        )
        sent = upstream.calls[0].headers
    return {name: sent[name] for name in ("X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-For")}


def test_forwarded_fields_from_a_trusted_proxy_are_believed_but_its_host_only_when_configured(make_app):
    # Heroku's router is one hop: its X-Forwarded-For/-Proto describe the client; it passes a
    # client's own X-Forwarded-Host on, so that is believed only from its own setting.
    assert _forwarded_as_seen_upstream(make_app, hops=1) == {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "localhost",
        "X-Forwarded-For": "203.0.113.7, 10.1.2.3",
    }
    assert _forwarded_as_seen_upstream(make_app, hops=1, host_hops=1)["X-Forwarded-Host"] == "api.example"


def test_forwarded_fields_from_an_untrusted_client_are_not(make_app):
    assert _forwarded_as_seen_upstream(make_app, hops=0) == {
        "X-Forwarded-Proto": "http",
        "X-Forwarded-Host": "localhost",
        "X-Forwarded-For": "203.0.113.7, 10.1.2.3",
    }


# Path hygiene: a path an upstream could normalise into another route's path is refused.


def hygiene_routes(upstream_url: str) -> str:
    return f"""
upstreams:
  site:
    targets: ["{upstream_url}"]
routes:
  - {{path: /, upstream: site, auth: none}}
  - {{path: /private, upstream: site, auth: required}}
  - {{path: /lax, upstream: site, auth: none, allow_ambiguous_paths: true}}
"""


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("/private;x/things", "a ';' path parameter"),
        ("/private./things", "a segment ending in '.'"),
        ("/private%2e/things", "a segment ending in '.'"),
        ("/%5cprivate/things", "a backslash"),
        ("/%5Cprivate", "a backslash"),
        ("/public%2Fprivate", "an encoded '/' (%2F)"),
        ("/private%00/things", "a NUL byte"),
        ("/private%20/things", "a segment ending in white space"),
    ],
)
def test_an_ambiguous_path_is_refused_before_any_upstream_sees_it(make_app, upstream, path, what):
    client = make_app(routes=hygiene_routes(upstream.url)).test_client()

    response = client.get(path)

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["type"] == "/_gateway/problems/ambiguous-path"
    assert what in response.json["detail"]
    assert len(upstream.calls) == 0


def test_a_route_that_allows_ambiguous_paths_sends_them_on_as_they_came(make_app, upstream):
    client = make_app(routes=hygiene_routes(upstream.url)).test_client()

    response = client.get("/lax/a%2Fb;v=1/c.")

    assert response.status_code == 200 and response.data == b"up"
    assert upstream.calls[-1].path == "/lax/a%2Fb;v=1/c."


@pytest.mark.parametrize("path", ["/private/v1.2/things", "/private/file.txt", "/private/a%20b", "/private/%C3%A9"])
def test_ordinary_paths_are_not_ambiguous(make_app, upstream, path):
    client = make_app(routes=hygiene_routes(upstream.url)).test_client()

    assert client.get(path).status_code == 401  # routed to /private, which wants a credential


def test_route_matching_is_case_sensitive(make_app, upstream):
    client = make_app(routes=hygiene_routes(upstream.url)).test_client()

    assert client.get("/private/things").status_code == 401
    assert client.get("/PRIVATE/things").status_code == 200  # another path: the catch-all's


@pytest.mark.parametrize(
    ("sent", "received"),
    [
        ("/dest/items?page=2#top", "/dest/items?page=2#top"),  # a URI already: as it came
        ("http://other.example/a%20b;c=1", "http://other.example/a%20b;c=1"),
        ("/dest/a b", "/dest/a%20b"),  # not a URI: quoted as werkzeug's Response does (RFC 3986)
        ("/dest/\u00e4", "/dest/%C3%A4"),
    ],
)
def test_an_upstreams_location_reaches_the_client_as_a_uri(client, upstream, sent, received):
    upstream.replace("GET", re.compile("/.*"), status=302, headers={"Location": sent, "Content-Location": sent})
    response = client.get("/anything")
    assert response.status_code == 302
    assert response.headers["Location"] == received
    assert response.headers["Content-Location"] == received


def test_a_route_at_static_gets_every_path_under_it(make_app, upstream):
    # Flask's built-in /static/<path> endpoint is off: nothing under /static is the gateway's own.
    upstream.replace("GET", re.compile("/.*"), body=b"asset")
    app = make_app(routes=f"""
upstreams:
  site:
    targets: ["{upstream.url}"]
routes:
  - path: /static
    upstream: site
    auth: none
""")
    response = app.test_client().get("/static/app.js")
    assert response.status_code == 200 and response.data == b"asset"
    assert upstream.calls[-1].url == f"{upstream.url}/static/app.js"
    assert "static" not in app.view_functions


def test_flask_gateway_routes_prints_the_route_file_as_served(make_app, upstream):
    app = make_app(routes=f"""
upstreams:
  site:
    targets: ["{upstream.url}"]
routes:
  - {{path: /orders, upstream: site, methods: [GET, POST], auth: required, rate_limit: "5/minute"}}
  - {{path: /report, upstream: site, mode: async, auth: none, rate_limit: none}}
  - {{path: /page, upstream: site, methods: [GET], cache: {{ttl: 30}}}}
""")
    cli = app.test_cli_runner()

    listed = cli.invoke(args=["gateway", "routes"])

    assert listed.exit_code == 0, listed.output
    assert [line.split("\t") for line in listed.stdout.splitlines()] == [
        ["/orders", "GET,POST", "site", "sync", "required", "5/minute", "-"],
        ["/report", "*", "site", "async", "none", "none", "-"],
        ["/page", "GET", "site", "sync", "optional", "-", "30"],
    ]
    assert "3 routes, digest " in listed.stderr
    shown = json.loads(cli.invoke(args=["gateway", "routes", "--json"]).stdout)
    assert [(route["path"], route["mode"]) for route in shown] == [("/orders", "sync"), ("/report", "async"), ("/page", "sync")]
