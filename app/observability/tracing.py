"""W3C Trace Context (https://www.w3.org/TR/trace-context/) on every request, and OpenTelemetry
spans exported over OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.

Always: a request's ``traceparent`` is continued when valid, else a trace is started (sampled,
so that upstreams which trace record it). The gateway is a hop of its own: upstreams, the
messages of the Celery tasks a request sends, and the webhook deliveries those tasks make get
``traceparent`` with the trace id and a parent id of the gateway's; ``tracestate`` goes along
with a valid ``traceparent`` unchanged, and is dropped with an invalid one (section 3.3).

With ``OTEL_EXPORTER_OTLP_ENDPOINT`` and the ``otel`` extra installed: the OpenTelemetry SDK exports spans with the OTLP/HTTP
exporter (configured by the standard ``OTEL_*`` variables), and Flask, requests and Celery are
instrumented; the context above is then the current span's. Query values in span URLs are
exported as ``REDACTED`` (a query may carry a key or token). Without it nothing is
instrumented or exported: instrumenting with a no-op provider still cost about 110 us of CPU per
request (measured with Flask's and requests' instrumentations), so it is not done at all.
"""
from __future__ import annotations

import importlib
import logging
import os
import random
import re
from contextvars import ContextVar
from dataclasses import dataclass

from flask import Flask, g, has_request_context, request

ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
log = logging.getLogger("frontdoor.tracing")
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
# version-trace_id-parent_id-flags, and for a later version whatever follows (section 3.2.4).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
_enabled = False

# The trace of the proxied request this thread serves (app/gateway/proxy.py), or of the task it
# runs (app/observability/tasks.py sets it from the message).
work_trace: ContextVar[TraceContext | None] = ContextVar("frontdoor_trace", default=None)


@dataclass(frozen=True)
class TraceContext:
    """One hop of a trace: ``trace_id`` (32 hex digits), ``span_id`` (16 hex digits: this
    hop's, sent on as the parent id), ``flags`` (2 hex digits; 01 is sampled) and ``state``
    (the ``tracestate`` field, passed on as it came)."""

    trace_id: str
    span_id: str
    flags: str = "01"
    state: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def fields(self) -> list[tuple[str, str]]:
        """The header fields to send on: ``traceparent`` and, when there is one, ``tracestate``."""
        return [(TRACEPARENT, self.traceparent)] + ([(TRACESTATE, self.state)] if self.state else [])


def parse(traceparent: str | None) -> tuple[str, str] | None:
    """``(trace_id, flags)`` of a valid ``traceparent`` field, else None (section 3.2).

    Version 00 is exactly four fields; a later version (not ff) is read for its first four.
    All-zero trace or parent ids are invalid.
    """
    found = _TRACEPARENT.fullmatch(traceparent.strip()) if traceparent else None
    if found is None:
        return None
    version, trace_id, parent_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, flags


def accept_or_start(traceparent: str | None, tracestate: str | None) -> TraceContext:
    """This hop's context for a request that came with these fields (either may be None)."""
    if _enabled:
        from opentelemetry import trace

        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            return TraceContext(f"{span.trace_id:032x}", f"{span.span_id:016x}", f"{span.trace_flags:02x}", tracestate or None)
    return continued(traceparent, tracestate) or TraceContext(_new_trace_id(), _new_span_id())


def continued(traceparent: str | None, tracestate: str | None) -> TraceContext | None:
    """A new hop of the trace these fields name; None when ``traceparent`` is not valid."""
    parsed = parse(traceparent)
    if parsed is None:
        return None
    trace_id, flags = parsed
    return TraceContext(trace_id, _new_span_id(), flags, (tracestate or "").strip() or None)


def current() -> TraceContext | None:
    """The context of the request this thread serves, or of the task it runs; None outside both."""
    if has_request_context():
        return g.get("trace")
    return work_trace.get()


def _new_trace_id() -> str:
    # random, as request ids (app/gateway/request_id.py): unique, without a system call per request
    return f"{random.getrandbits(128) or 1:032x}"


def _new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def _begin() -> None:
    headers = request.headers
    g.trace = accept_or_start(headers.get(TRACEPARENT), headers.get(TRACESTATE))


# Span attributes that carry a request's URL or query (old and stable HTTP semantic conventions).
_URL_ATTRIBUTES = ("http.target", "http.url", "url.full")


def _redacted_query(query: str) -> str:
    """``a=1&api_key=x`` as ``a=REDACTED&api_key=REDACTED``: names kept, values never exported
    (a query may carry a key or token; the access line leaves the query out altogether)."""
    return "&".join(f"{part.partition('=')[0]}=REDACTED" if part else part for part in query.split("&"))


def redact_span(span, *_: object) -> None:
    """Replace the query values in a recording span's URL attributes. The instrumentations only
    redact a few cloud-storage signature parameters (opentelemetry-util-http's ``redact_url``)."""
    if not span.is_recording():
        return
    attributes = getattr(span, "attributes", None) or {}
    for key in _URL_ATTRIBUTES:
        value = attributes.get(key)
        if isinstance(value, str) and "?" in value:
            base, _, query = value.partition("?")
            span.set_attribute(key, f"{base}?{_redacted_query(query.partition('#')[0])}")
    query = attributes.get("url.query")
    if isinstance(query, str) and query:
        span.set_attribute("url.query", _redacted_query(query))


def _redact_server_span() -> None:
    from opentelemetry import trace

    redact_span(trace.get_current_span())


def name_server_span(name: str) -> None:
    """Name the current server span (``"GET /users"``: the method and the matched route)."""
    from opentelemetry import trace

    trace.get_current_span().update_name(name)


def instrument_wsgi(wsgi_app):
    """``wsgi_app`` (the proxy, outside Flask) inside OpenTelemetry's WSGI middleware when spans
    are exported, its URL attributes redacted as the Flask app's are; else ``wsgi_app`` itself."""
    if not _enabled:
        return wsgi_app
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    return OpenTelemetryMiddleware(wsgi_app, request_hook=redact_span)


def enabled() -> bool:
    """Whether OpenTelemetry spans are recorded and exported in this process."""
    return _enabled


def _set_up_opentelemetry(app: Flask) -> None:
    """The SDK, the OTLP/HTTP exporter and the instrumentations; once per process."""
    global _enabled
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.instrumentation.requests import RequestsInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if not _enabled:
        # OTEL_SERVICE_NAME, when set, names the service (the SDK reads it); else "frontdoor".
        resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": "frontdoor"})
        provider = TracerProvider(resource=resource)
        # The batch processor's thread is restarted in forked children (Celery's prefork pool).
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
        RequestsInstrumentor().instrument(request_hook=redact_span)
        CeleryInstrumentor().instrument()
        _enabled = True
    FlaskInstrumentor().instrument_app(app)
    # The server span's URL attributes are set after its request hook runs: redact them in a
    # before_request of our own, which Flask runs after the instrumentation's.
    app.before_request(_redact_server_span)


# What exporting spans needs: the ``otel`` extra (setup.cfg). Without it a process only
# propagates traceparent, as when no endpoint is set.
OTEL_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.instrumentation.flask",
    "opentelemetry.instrumentation.requests",
    "opentelemetry.instrumentation.celery",
    "opentelemetry.instrumentation.wsgi",
)


def otel_missing() -> list[str]:
    """The modules of OTEL_MODULES that cannot be imported here."""
    missing = []
    for name in OTEL_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def init_app(app: Flask) -> None:
    """Give every request its trace context; set up OpenTelemetry when its endpoint is set and
    the ``otel`` extra is installed (else one warning says so, and traceparent is still
    propagated)."""
    if os.environ.get(ENDPOINT):
        missing = otel_missing()
        if missing:
            log.warning(
                "%s is set but OpenTelemetry is not installed (missing %s): spans are not exported, traceparent is still "
                "propagated; install the otel extra (pip install 'frontdoor[otel]', pinned in requirements-dev.txt)",
                ENDPOINT, ", ".join(missing),
            )
        else:
            _set_up_opentelemetry(app)
    app.before_request(_begin)  # after the Flask instrumentation's own, which starts the span
