"""Metrics as /metrics shows them: requests by route, method and status, latency, cache results,
breakers, bulkheads, and the updater thread the web workers count through."""
from __future__ import annotations

import re
import threading

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.datastructures import Headers

from app.gateway.breaker import TargetBreakers
from app.gateway.bulkhead import bulkhead, new_slots
from app.gateway.routefile import Breaker
from app.gateway.types import BulkheadFull, GatewayResponse, UpstreamTimeout
from app.observability import metrics
from tests import services
from tests.stub_upstream import StubUpstream


def routes(upstream_url: str) -> str:
    return f"""
upstreams:
  up:
    targets: ["{upstream_url}"]
routes:
  - {{path: /plain, upstream: up, auth: none, rate_limit: none}}
  - {{path: /cached, upstream: up, auth: none, rate_limit: none, cache: {{ttl: 60, public: true}}}}
"""


@pytest.fixture
def client(make_app):
    with StubUpstream() as upstream:
        upstream.add("GET", re.compile("/.*"), body=b"up")
        upstream.add("POST", re.compile("/.*"), body=b"made", status=201)
        yield make_app(routes=routes(upstream.url), KEY_PREFIX=services.unique("metrics")).test_client()


def answered(client, method: str, path: str, **kwargs):
    """``client``'s response, closed: a request is counted once its body has been sent."""
    response = client.open(path, method=method, **kwargs)
    response.close()
    return response


def scraped(client, name: str, **labels: str) -> float:
    """A sample's value as ``/metrics`` shows it (the Prometheus text format); 0.0 when absent."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_are_counted_by_route_method_and_status(client):
    before = {
        "get": scraped(client, "frontdoor_http_requests_total", route="/plain", method="GET", status="200"),
        "post": scraped(client, "frontdoor_http_requests_total", route="/plain", method="POST", status="201"),
        "own": scraped(client, "frontdoor_http_requests_total", route="/healthz", method="GET", status="200"),
        "nowhere": scraped(client, "frontdoor_http_requests_total", route="unmatched", method="GET", status="404"),
        "timed": scraped(client, "frontdoor_http_request_duration_seconds_count", route="/plain"),
        "upstream": scraped(client, "frontdoor_upstream_duration_seconds_count", route="/plain"),
    }

    for _ in range(3):
        assert answered(client, "GET", "/plain/x?page=1").status_code == 200
    assert answered(client, "POST", "/plain/y", data=b"{}").status_code == 201
    assert answered(client, "GET", "/healthz").status_code == 200
    assert answered(client, "GET", "/no/such/route").status_code == 404

    assert scraped(client, "frontdoor_http_requests_total", route="/plain", method="GET", status="200") == before["get"] + 3
    assert scraped(client, "frontdoor_http_requests_total", route="/plain", method="POST", status="201") == before["post"] + 1
    # The gateway's own endpoints by their URL rule; a path no route matches is 'unmatched', never the raw path.
    assert scraped(client, "frontdoor_http_requests_total", route="/healthz", method="GET", status="200") == before["own"] + 1
    assert scraped(client, "frontdoor_http_requests_total", route="unmatched", method="GET", status="404") == before["nowhere"] + 1
    assert "/no/such/route" not in client.get("/metrics").get_data(as_text=True)
    assert scraped(client, "frontdoor_http_request_duration_seconds_count", route="/plain") == before["timed"] + 4
    assert scraped(client, "frontdoor_upstream_duration_seconds_count", route="/plain") == before["upstream"] + 4


def test_cache_answers_are_counted_as_miss_then_hit(client):
    miss = scraped(client, "frontdoor_cache_responses_total", route="/cached", result="miss")
    hit = scraped(client, "frontdoor_cache_responses_total", route="/cached", result="hit")

    statuses = [answered(client, "GET", "/cached/thing").headers["Cache-Status"] for _ in range(3)]

    assert statuses[0].endswith("fwd=miss; stored") and all("hit" in s for s in statuses[1:])
    assert scraped(client, "frontdoor_cache_responses_total", route="/cached", result="miss") == miss + 1
    assert scraped(client, "frontdoor_cache_responses_total", route="/cached", result="hit") == hit + 2


@pytest.mark.parametrize(
    ("field", "result"),
    [
        ("frontdoor; hit; ttl=59", "hit"),
        ("frontdoor; hit; ttl=3; collapsed", "hit"),
        ("frontdoor; fwd=miss; stored", "miss"),
        ("frontdoor; fwd=uri-miss", "miss"),
        ("frontdoor; fwd=stale; fwd-status=503; ttl=-2; detail=stale-if-error", "stale"),
        ("origin-cdn; hit, frontdoor; fwd=miss; stored", "miss"),  # the last member is the gateway's
        ("origin-cdn; hit", ""),
        (None, ""),
    ],
)
def test_cache_result_reads_the_gateways_cache_status_member(field, result):
    assert metrics.cache_result(field) == result


def test_breaker_transitions_and_state_are_counted_per_target():
    target = f"http://breaker-{services.unique('t')}.test"
    breakers = TargetBreakers("metered", (target,), Breaker(fail_max=2, reset_timeout=30))

    for _ in range(2):
        breakers.record(target, UpstreamTimeout("slow"))

    assert breakers.state(target) == "open"
    assert value("frontdoor_breaker_transitions_total", upstream="metered", target=target, state="open") == 1
    assert value("frontdoor_breaker_state", upstream="metered", target=target) == 2


def test_bulkhead_rejections_are_counted_per_upstream():
    upstream = services.unique("bulk")
    held, release = threading.Event(), threading.Event()

    def slow(req):
        held.set()
        release.wait(5)
        return GatewayResponse(status=200, headers=Headers())

    handler = bulkhead(upstream, new_slots(1))(slow)
    worker = threading.Thread(target=handler, args=(None,))
    worker.start()
    held.wait(5)
    try:
        with pytest.raises(BulkheadFull):
            handler(None)
    finally:
        release.set()
        worker.join()

    assert value("frontdoor_bulkhead_rejected_total", upstream=upstream) == 1


def test_in_the_background_every_update_is_applied_by_the_time_it_stops():
    route = f"/bg-{services.unique('r')}"
    metrics.update_in_background()
    try:
        def work() -> None:
            for _ in range(250):
                metrics.request_done(route, "GET", 200, 0.002, 0.001, "frontdoor; hit; ttl=1")

        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        metrics.stop_background()

    assert value("frontdoor_http_requests_total", route=route, method="GET", status="200") == 2000
    assert value("frontdoor_http_request_duration_seconds_count", route=route) == 2000
    assert value("frontdoor_cache_responses_total", route=route, result="hit") == 2000
    # After stop, updates are made by the caller at once.
    metrics.request_done(route, "GET", 200, None, None, None)
    assert value("frontdoor_http_requests_total", route=route, method="GET", status="200") == 2001
