"""The process's WSGI entry: what it answers before any path is matched (OPTIONS *, no Host)."""
from __future__ import annotations

import json
import re

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

from tests.stub_upstream import StubUpstream

ROUTES = """
upstreams:
  site:
    targets: ["{url}"]
routes:
  - path: /
    upstream: site
"""


@pytest.fixture
def upstream():
    with StubUpstream() as stub:
        stub.add("OPTIONS", re.compile("/.*"), body=b"up")
        stub.add("GET", re.compile("/.*"), body=b"up")
        yield stub


@pytest.fixture
def app(make_app, upstream):
    return make_app(routes=ROUTES.format(url=upstream.url))


def call(app, method: str, path: str, protocol: str = "HTTP/1.1", host: bool = True):
    environ = EnvironBuilder(method=method, path="/", headers={"X-Request-ID": "req-1"}).get_environ()
    environ["PATH_INFO"], environ["SERVER_PROTOCOL"] = path, protocol
    if not host:
        del environ["HTTP_HOST"]
    body, status, headers = run_wsgi_app(app.wsgi_app, environ, buffered=True)
    return status, headers, b"".join(body)


def test_options_asterisk_is_answered_by_the_gateway_with_the_methods_it_serves(app, upstream):
    # RFC 9110 section 9.3.7: the server in general, not a resource; never the catch-all route.
    status, headers, body = call(app, "OPTIONS", "*")
    assert status == "200 OK"
    assert headers["Allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert headers["X-Request-ID"] == "req-1"
    assert body == b""
    assert upstream.calls == []


def test_options_on_a_path_still_goes_to_its_route(app, upstream):
    status, _, body = call(app, "OPTIONS", "/x")
    assert status == "200 OK"
    assert body == b"up"


def test_an_http_1_1_request_without_host_is_a_400_problem(app, upstream):
    status, headers, body = call(app, "GET", "/x", host=False)
    assert status == "400 BAD REQUEST"
    assert headers["Content-Type"] == "application/problem+json"
    assert json.loads(body) == {
        "type": "about:blank",
        "title": "Bad Request",
        "status": 400,
        "detail": "An HTTP/1.1 request must have a Host field (RFC 9112 section 3.2)",
        "request_id": "req-1",
    }
    assert upstream.calls == []


@pytest.mark.parametrize("path", ["/x", "/healthz"])
def test_an_http_1_0_request_may_leave_host_out(app, path):
    status, _, _ = call(app, "GET", path, protocol="HTTP/1.0", host=False)
    assert status == "200 OK"
