"""Assembly: a route's whole pipeline, from client body to upstream answer, against a stub upstream."""
from __future__ import annotations

import io

import pytest
from werkzeug.exceptions import MethodNotAllowed

from app.gateway import retry as retry_module
from app.gateway.body import ClientBody
from app.gateway.pipeline import Settings, assemble, build_router, build_upstreams
from app.gateway.routefile import RouteFile
from app.gateway.types import BreakerOpen, BulkheadFull, PayloadTooLarge
from tests.services import free_port
from tests.stub_upstream import StubUpstream
from tests.unit.gateway.stand_ins import make_request

A, B = "http://a.test", "http://b.test"  # target names only: the tests that send requests use the stub's
SETTINGS = Settings(max_body_size=1000, buffer_body_size=100, pool_size=2, via_name="frontdoor", key_prefix="test")


@pytest.fixture
def upstream():
    """A stub upstream listening on two ports: ``a, b = upstream.targets``."""
    with StubUpstream() as stub:
        stub.add_target()
        yield stub


@pytest.fixture
def runtimes():
    """Build upstreams with ``build(route_file_dict)``; their pools are closed afterwards."""
    built = []

    def build(tree: dict):
        route_file = RouteFile.model_validate(tree)
        upstreams = build_upstreams(route_file, SETTINGS, redis_client=None)
        built.extend(upstreams.values())
        return route_file, upstreams

    yield build
    for runtime in built:
        runtime.close()


def pipeline_for(runtimes, upstream_config: dict, **route):
    route_file, upstreams = runtimes(
        {"upstreams": {"svc": upstream_config}, "routes": [{"path": "/svc", "upstream": "svc", **route}]}
    )
    return assemble(route_file.routes[0], upstreams["svc"], SETTINGS)


def client_request(method="GET", path="/svc/items", body: bytes | None = None, headers=(), **fields):
    headers = [("Host", "gw.example.com"), *headers]
    if body is not None:
        headers.append(("Content-Length", str(len(body))))
    fields.setdefault("upstream_path", path)
    return make_request(
        method,
        path,
        headers=headers,
        body=ClientBody(io.BytesIO(body), len(body)) if body is not None else None,
        client_addr="203.0.113.7",
        scheme="https",
        host="gw.example.com",
        request_id="req-42",
        **fields,
    )


def read(response) -> bytes:
    try:
        return b"".join(response.body)
    finally:
        response.close()


def test_a_get_reaches_the_target_with_forwarding_headers(runtimes, upstream):
    upstream.add("GET", "/svc/items", body=b"[1, 2]", headers={"Via": "1.1 backend", "Connection": "close"})
    handle = pipeline_for(runtimes, {"targets": [upstream.url]})

    response = handle(client_request(headers=[("Connection", "keep-alive"), ("X-Forwarded-For", "198.51.100.1")]))

    assert response.status == 200
    assert read(response) == b"[1, 2]"
    assert response.headers["Via"] == "1.1 backend, 1.1 frontdoor"
    assert "Connection" not in response.headers
    sent = upstream.calls[0].headers
    assert sent["X-Forwarded-For"] == "198.51.100.1, 203.0.113.7"
    assert sent["X-Forwarded-Proto"] == "https"
    assert sent["X-Forwarded-Host"] == "gw.example.com"
    assert sent["Via"] == "1.1 frontdoor"
    assert sent["X-Request-ID"] == "req-42"
    assert "Connection" not in sent
    assert sent["Host"] == upstream.url.removeprefix("http://")  # the target's, never the client's


def test_strip_prefix_and_query_reach_the_upstream(runtimes, upstream):
    upstream.add("GET", "/items", body=b"ok")
    route_file, upstreams = runtimes(
        {"upstreams": {"svc": {"targets": [upstream.url]}}, "routes": [{"path": "/svc", "upstream": "svc", "strip_prefix": True}]}
    )
    router = build_router(route_file, upstreams, SETTINGS)
    match = router.match("GET", "/svc/items")

    response = match.handler(client_request(upstream_path=match.upstream_path, query="page=2"))

    assert read(response) == b"ok"
    assert upstream.calls[0].url == f"{upstream.url}/items?page=2"


def test_a_small_body_is_sent_and_resent_on_a_retry(runtimes, upstream):
    a, b = upstream.targets
    upstream.add("PUT", f"{a}/svc/items", status=503)
    upstream.add("PUT", f"{b}/svc/items", status=200, body=b"stored")
    handle = pipeline_for(runtimes, {"targets": [a, b], "retries": {"attempts": 2, "backoff": 0}})

    response = handle(client_request("PUT", body=b'{"n": 1}'))

    assert response.status == 200
    assert read(response) == b"stored"
    assert [call.url for call in upstream.calls] == [f"{a}/svc/items", f"{b}/svc/items"]
    assert [call.body for call in upstream.calls] == [b'{"n": 1}', b'{"n": 1}']


def test_a_post_is_retried_on_the_next_target_only_when_the_connect_failed(runtimes, upstream):
    refusing = f"http://127.0.0.1:{free_port()}"  # nothing listens: the connect is refused
    upstream.add("POST", "/svc/items", status=201)
    handle = pipeline_for(runtimes, {"targets": [refusing, upstream.url], "retries": {"attempts": 3, "backoff": 0}})
    request = client_request("POST", body=b"{}")

    response = handle(request)

    assert response.status == 201
    response.close()
    assert request.tried_targets == {refusing, upstream.url}
    assert len(upstream.calls) == 1  # the refused attempt never reached an upstream


def test_a_post_answered_503_is_not_retried(runtimes, upstream):
    a, b = upstream.targets
    upstream.add("POST", f"{a}/svc/items", status=503)
    upstream.add("POST", f"{b}/svc/items", status=201)
    handle = pipeline_for(runtimes, {"targets": [a, b], "retries": {"attempts": 3, "backoff": 0}})

    response = handle(client_request("POST", body=b"{}"))

    assert response.status == 503
    response.close()
    assert len(upstream.calls) == 1


def test_without_retries_a_503_is_passed_on(runtimes, upstream):
    a, b = upstream.targets
    upstream.add("GET", f"{a}/svc/items", status=503)
    handle = pipeline_for(runtimes, {"targets": [a, b]})

    assert read_status(handle(client_request())) == 503
    assert len(upstream.calls) == 1


def read_status(response) -> int:
    read(response)
    return response.status


def test_a_failing_target_is_taken_out_and_then_every_target(runtimes, upstream):
    a, b = upstream.targets
    upstream.add("GET", f"{a}/svc/items", status=500)
    upstream.add("GET", f"{b}/svc/items", status=200)
    handle = pipeline_for(runtimes, {"targets": [a, b], "breaker": {"fail_max": 2, "reset_timeout": 60}})

    statuses = [read_status(handle(client_request())) for _ in range(6)]

    assert statuses == [500, 200, 500, 200, 200, 200]
    upstream.replace("GET", f"{b}/svc/items", status=502)
    assert [read_status(handle(client_request())) for _ in range(2)] == [502, 502]
    with pytest.raises(BreakerOpen) as caught:
        handle(client_request())
    assert caught.value.headers == {"Retry-After": "60"}
    assert len(upstream.calls) == 8


def test_a_body_over_the_limit_is_refused_before_the_upstream_is_called(runtimes, upstream):
    upstream.add("POST", "/svc/items", status=201)
    handle = pipeline_for(runtimes, {"targets": [upstream.url]})

    with pytest.raises(PayloadTooLarge):
        handle(client_request("POST", body=b"x" * 1001))
    assert len(upstream.calls) == 0


def test_the_routes_max_body_size_overrides_the_default(runtimes, upstream):
    upstream.add("POST", "/svc/items", status=201)
    handle = pipeline_for(runtimes, {"targets": [upstream.url]}, max_body_size=10)

    with pytest.raises(PayloadTooLarge):
        handle(client_request("POST", body=b"x" * 11))
    assert read_status(handle(client_request("POST", body=b"x" * 10))) == 201


def test_the_bulkhead_holds_a_slot_until_the_answer_is_closed(runtimes, upstream):
    upstream.add("GET", "/svc/items", body=b"ok")
    handle = pipeline_for(runtimes, {"targets": [upstream.url], "max_concurrency": 1})
    first = handle(client_request())

    with pytest.raises(BulkheadFull):
        handle(client_request())
    read(first)

    assert read_status(handle(client_request())) == 200
    assert len(upstream.calls) == 2


def test_a_retrying_request_keeps_its_slot_while_it_backs_off(runtimes, upstream, monkeypatch):
    a, b = upstream.targets
    upstream.add("GET", f"{a}/svc/items", status=503)
    upstream.add("GET", f"{b}/svc/items", status=200)
    handle = pipeline_for(runtimes, {"targets": [a, b], "max_concurrency": 1, "retries": {"attempts": 2}})
    arrived_during_backoff = []

    def another_request_arrives(*args):
        try:
            arrived_during_backoff.append(read_status(handle(client_request())))
        except BulkheadFull as exc:
            arrived_during_backoff.append(exc.status)
        return 0

    monkeypatch.setattr(retry_module, "backoff_delay", another_request_arrives)

    assert read_status(handle(client_request())) == 200

    assert arrived_during_backoff == [503]  # refused: the upstream already has its one request
    assert len(upstream.calls) == 2


def test_routes_of_one_upstream_share_its_bulkhead(runtimes, upstream):
    upstream.add("GET", "/one", body=b"1")
    upstream.add("GET", "/two", body=b"2")
    route_file, upstreams = runtimes(
        {
            "upstreams": {"svc": {"targets": [upstream.url], "max_concurrency": 1}},
            "routes": [{"path": "/one", "upstream": "svc"}, {"path": "/two", "upstream": "svc"}],
        }
    )
    router = build_router(route_file, upstreams, SETTINGS)
    held = router.match("GET", "/one").handler(client_request(path="/one"))

    with pytest.raises(BulkheadFull):
        router.match("GET", "/two").handler(client_request(path="/two"))
    read(held)


def test_the_router_knows_each_routes_methods(runtimes):
    route_file, upstreams = runtimes(
        {"upstreams": {"svc": {"targets": [A]}}, "routes": [{"path": "/svc", "upstream": "svc", "methods": ["GET"]}]}
    )

    with pytest.raises(MethodNotAllowed):
        build_router(route_file, upstreams, SETTINGS).match("DELETE", "/svc")


def test_each_upstream_gets_its_own_breakers_and_bulkhead(runtimes):
    _, upstreams = runtimes(
        {
            "upstreams": {
                "one": {"targets": [A, B], "max_concurrency": 3},
                "two": {"targets": [A], "breaker": {"fail_max": 9}},
            }
        }
    )

    assert set(upstreams) == {"one", "two"}
    assert upstreams["one"].slots is not None and upstreams["two"].slots is None
    assert upstreams["two"].breakers.config.fail_max == 9
    assert set(upstreams["one"].breakers.breakers) == {A, B}
