"""W3C Trace Context: a request's traceparent is continued or a trace started, and upstreams see
the gateway as a hop of that trace; without OTEL_EXPORTER_OTLP_ENDPOINT nothing is instrumented."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider

from app.observability import tracing
from tests import services
from tests.stub_upstream import StubUpstream

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = "00f067aa0ba902b7"
VALID = f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"
FIELD = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def routes(upstream_url: str) -> str:
    return f"""
upstreams:
  up:
    targets: ["{upstream_url}"]
routes:
  - {{path: /plain, upstream: up, auth: none, rate_limit: none}}
  - path: /screen
    auth: none
    rate_limit: none
    aggregate:
      a: {{upstream: up, path: /a}}
      b: {{upstream: up, path: /b}}
"""


@pytest.fixture
def upstream():
    with StubUpstream() as stub:
        yield stub


@pytest.fixture
def upstream_seen(upstream):
    """What the upstream was sent: a list of each request's headers (lower-case names)."""
    seen: list[dict[str, str]] = []

    def answer(request):
        seen.append({name.lower(): value for name, value in request.headers.items()})
        return 200, {"Content-Type": "application/json"}, json.dumps({"ok": True})

    upstream.add_callback("GET", re.compile("/.*"), answer)
    return seen


@pytest.fixture
def client(make_app, upstream):
    return make_app(routes=routes(upstream.url), KEY_PREFIX=services.unique("trace")).test_client()


@pytest.mark.parametrize(
    ("field", "parsed"),
    [
        (VALID, (CLIENT_TRACE, "01")),
        (f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-00", (CLIENT_TRACE, "00")),
        (f" {VALID} ", (CLIENT_TRACE, "01")),  # optional whitespace around the value
        (f"01-{CLIENT_TRACE}-{CLIENT_PARENT}-01-what-comes-later", (CLIENT_TRACE, "01")),  # a later version: its first fields
        (f"00-{CLIENT_TRACE}-{CLIENT_PARENT}-01-extra", None),  # version 00 has exactly four fields
        (f"ff-{CLIENT_TRACE}-{CLIENT_PARENT}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{CLIENT_PARENT}-01", None),  # all-zero trace id
        (f"00-{CLIENT_TRACE}-{'0' * 16}-01", None),  # all-zero parent id
        (VALID.upper(), None),  # hex digits are lower case
        (f"00-{CLIENT_TRACE[:-1]}-{CLIENT_PARENT}-01", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_follows_the_traceparent_grammar(field, parsed):
    assert tracing.parse(field) == parsed


def test_a_valid_traceparent_is_continued_with_the_gateway_as_the_parent_and_tracestate_kept(client, upstream_seen):
    response = client.get("/plain/x", headers={"traceparent": VALID, "tracestate": "vendor=abc,other=1"})

    assert response.status_code == 200
    [sent] = upstream_seen
    trace_id, parent_id, flags = FIELD.fullmatch(sent["traceparent"]).groups()
    assert (trace_id, flags) == (CLIENT_TRACE, "01")
    assert parent_id != CLIENT_PARENT  # the gateway's own hop
    assert sent["tracestate"] == "vendor=abc,other=1"


def test_an_invalid_traceparent_starts_a_new_trace_and_its_tracestate_is_dropped(client, upstream_seen):
    client.get("/plain/x", headers={"traceparent": f"00-{'0' * 32}-{CLIENT_PARENT}-01", "tracestate": "vendor=abc"})

    [sent] = upstream_seen
    trace_id, _, flags = FIELD.fullmatch(sent["traceparent"]).groups()
    assert trace_id != "0" * 32 and flags == "01"
    assert "tracestate" not in sent


def test_without_a_traceparent_each_request_starts_a_trace_of_its_own(client, upstream_seen):
    for _ in range(2):
        client.get("/plain/x")

    traces = [FIELD.fullmatch(sent["traceparent"]).group(1) for sent in upstream_seen]
    assert len(set(traces)) == 2


def test_every_call_of_an_aggregate_is_a_hop_of_the_requests_trace(client, upstream_seen):
    assert client.get("/screen", headers={"traceparent": VALID}).status_code == 200

    assert len(upstream_seen) == 2
    assert {FIELD.fullmatch(sent["traceparent"]).group(1) for sent in upstream_seen} == {CLIENT_TRACE}


def test_without_an_otlp_endpoint_nothing_is_instrumented(make_app, monkeypatch):
    monkeypatch.delenv(tracing.ENDPOINT, raising=False)
    app = make_app(routes=routes("http://traced-upstream.test"))

    assert not tracing.enabled()
    assert not isinstance(otel_trace.get_tracer_provider(), TracerProvider)  # the API's no-op proxy
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert app.wsgi_app.__class__.__name__ != "OpenTelemetryMiddleware"
    assert app.wsgi_app.proxy.__class__.__name__ != "OpenTelemetryMiddleware"  # the proxy app behind the entry


def test_a_spans_url_attributes_keep_query_names_but_never_their_values():
    # The requests instrumentation's hook and the server span's before_request both do this.
    span = TracerProvider().get_tracer("test").start_span(
        "GET",
        attributes={
            "http.url": "https://hooks.example/in?token=t-81&x=1#frag",
            "http.target": "/p?api_key=k-93",
            "url.query": "access_token=a-12&flag",
            "http.method": "GET",
        },
    )
    tracing.redact_span(span)
    span.end()

    assert dict(span.attributes) == {
        "http.url": "https://hooks.example/in?token=REDACTED&x=REDACTED",
        "http.target": "/p?api_key=REDACTED",
        "url.query": "access_token=REDACTED&flag=REDACTED",
        "http.method": "GET",
    }


WITHOUT_OTEL = """
import importlib.abc, json, os, sys

class NoOpenTelemetry(importlib.abc.MetaPathFinder):  # as a runtime install without the otel extra
    def find_spec(self, name, path, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoOpenTelemetry())
from app import create_app
from app.observability import tracing
from tests.stub_upstream import StubUpstream

with StubUpstream() as upstream:
    upstream.add("GET", "/items", body=b"ok")
    routes = os.environ["ROUTES_FILE"]
    open(routes, "w").write(f"upstreams: {{up: {{targets: ['{upstream.url}']}}}}\\nroutes: [{{path: /items, upstream: up, auth: none}}]\\n")
    app = create_app()
    answer = app.test_client().get("/items", headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"})
    print(json.dumps({"status": answer.status_code, "enabled": tracing.enabled(), "sent": upstream.calls[0].headers.get("traceparent"),
                      "loaded": sorted(name for name in sys.modules if name.startswith("opentelemetry"))}))
"""


def test_without_the_otel_extra_an_otlp_endpoint_gets_one_warning_and_traceparent_still_travels(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "OTEL_"))}, tracing.ENDPOINT: "http://127.0.0.1:9/", "ROUTES_FILE": str(tmp_path / "routes.yaml"),
           "GATEWAY_CONFIG": str(tmp_path / "routes.yaml"), "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}"}
    done = subprocess.run([sys.executable, "-c", WITHOUT_OTEL], cwd=services.ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = services.json_lines(done.stdout)
    seen = next(line for line in lines if "status" in line)
    assert seen["status"] == 200 and seen["enabled"] is False and seen["loaded"] == []
    assert FIELD.fullmatch(seen["sent"]).group(1) == CLIENT_TRACE  # the trace goes on, the gateway as a hop
    warnings = [line for line in lines if line.get("logger") == "frontdoor.tracing"]
    assert len(warnings) == 1 and "otel extra" in warnings[0]["msg"] and "OTEL_EXPORTER_OTLP_ENDPOINT" in warnings[0]["msg"]
