"""OpenTelemetry on: with OTEL_EXPORTER_OTLP_ENDPOINT set, a gateway under gunicorn exports the
span of a request (Flask's server span) over OTLP/HTTP, in the trace the client's traceparent
names, and the upstream is told that span as its parent; query values are redacted."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

pytestmark = [pytest.mark.slow]

ROUTES = """
upstreams:
  httpbin:
    targets: ["{httpbin}"]
routes:
  - {{path: /httpbin, upstream: httpbin, strip_prefix: true, auth: none, rate_limit: none}}
"""
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"


class Collector:
    """An OTLP/HTTP trace receiver (POST /v1/traces, protobuf): the spans it was sent."""

    def __init__(self):
        self.spans: list[Span] = []
        self.resources: list[dict] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                export = ExportTraceServiceRequest.FromString(body)
                for resource_spans in export.resource_spans:
                    attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        collector.resources += [attributes] * len(scope_spans.spans)
                        collector.spans += scope_spans.spans
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def in_trace(self, trace_id: str) -> list[Span]:
        return [span for span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture
def collector():
    made = Collector()
    yield made
    made.server.shutdown()
    made.server.server_close()


def test_spans_of_a_request_are_exported_in_the_clients_trace(start_gateway, httpbin_url, collector):
    gateway = start_gateway(
        ROUTES.format(httpbin=httpbin_url),
        workers=1,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
        OTEL_BSP_SCHEDULE_DELAY="100",  # milliseconds between exports
        OTEL_SERVICE_NAME="frontdoor-under-test",
    )

    response = requests.get(
        f"{gateway.url}/httpbin/headers?api_key=q-secret-41&n=1", headers={"traceparent": f"00-{TRACE_ID}-{CLIENT_PARENT}-01"}, timeout=10
    )
    assert response.status_code == 200
    deadline = time.monotonic() + 15
    while not collector.in_trace(TRACE_ID) and time.monotonic() < deadline:
        time.sleep(0.1)

    spans = collector.in_trace(TRACE_ID)
    # The proxy's server span is named by the method and the matched route (its label).
    assert [(span.kind, span.name) for span in spans] == [(Span.SpanKind.SPAN_KIND_SERVER, "GET /httpbin")]
    [server] = spans
    assert server.parent_span_id.hex() == CLIENT_PARENT  # the caller's span is the server span's parent
    # The upstream (httpbin echoes what it got) was told the gateway's span as its parent.
    assert response.json()["headers"]["Traceparent"] == f"00-{TRACE_ID}-{server.span_id.hex()}-01"
    assert {resource.get("service.name") for resource in collector.resources} == {"frontdoor-under-test"}
    # A query may carry a key or token: its values are never exported.
    attributes = {a.key: a.value.string_value for a in server.attributes}
    assert attributes["http.target"] == "/httpbin/headers?api_key=REDACTED&n=REDACTED"
    assert not [key for key, value in attributes.items() if "q-secret-41" in value]
