"""The proxy app: a plain WSGI application that serves every path outside the gateway's own.

``ProxyApp.__call__`` is the whole request path, read top to bottom: request id and trace,
route match, a CORS preflight answered (app.gateway.cors), authentication, rate limit, the route's pipeline, the answer; the access line
and the metrics once the body has been sent. There is no framework request cycle here: no
request context, no hooks, nothing passed through globals. ``Entry`` is the one WSGI entry
of the process: it hands the gateway's own paths to the Flask app and the rest to this.
"""
from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterable
from functools import partial
from urllib.parse import quote, urlsplit

from werkzeug.datastructures import EnvironHeaders, Headers
from werkzeug.exceptions import BadRequest, HTTPException, MethodNotAllowed, NotFound
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wrappers import Response
from werkzeug.wsgi import (
    ClosingIterator,
    get_content_length,
    get_host,
    get_input_stream,
)

from app.errors import PROBLEM_JSON, ProblemError, problem_document
from app.gateway import cors
from app.gateway.body import ClientBody
from app.gateway.request_id import HEADER, accept_or_generate
from app.gateway.router import has_dot_segment, refuse_ambiguous
from app.gateway.schema import METHODS
from app.gateway.types import GatewayRequest, GatewayResponse
from app.observability import tracing
from app.observability.logging import request_done, work_request_id

log = logging.getLogger("frontdoor.proxy")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
# The environ key of the Gateway a request started on: it finishes on it, reload or not.
GATEWAY = "frontdoor.gateway"


def request_path(environ: dict) -> str:
    """The decoded path, as werkzeug's ``Request.path`` gives it (UTF-8, invalid bytes replaced)."""
    raw = environ.get("PATH_INFO") or ""
    return "/" + raw.encode("latin-1").decode("utf-8", "replace").lstrip("/")


class Entry:
    """The process's WSGI entry: the gateway's own paths (``API_PREFIX``, /healthz, /readyz,
    /metrics, and everything below them) go to ``own``, the Flask app; every other path to
    ``proxy``. It takes the running Gateway for the request (``environ[GATEWAY]``), so that a
    reload swapping another in meanwhile does not change it halfway. Before that it answers
    what no path owns: ``OPTIONS *``, and an HTTP/1.1 request without ``Host`` (400)."""

    def __init__(self, control, own: WSGIApp, proxy: WSGIApp):
        self.control, self.own, self.proxy = control, own, proxy

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if "HTTP_HOST" not in environ and environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
            return answer_server(environ, start_response, 400, "An HTTP/1.1 request must have a Host field (RFC 9112 section 3.2)")
        if environ.get("PATH_INFO") == "*":  # gunicorn takes "*" with OPTIONS only
            return answer_server(environ, start_response, 200)
        environ[GATEWAY] = gateway = self.control.current()
        if gateway.is_reserved(request_path(environ)):
            return self.own(environ, start_response)
        return self.proxy(environ, start_response)


def answer_server(environ: dict, start_response: Callable, status: int, detail: str = "") -> Iterable[bytes]:
    """Answer a request about the server rather than a resource: ``OPTIONS *`` (RFC 9110
    section 9.3.7: 200 with the methods the gateway serves in ``Allow``), or a request that is
    not one (``status`` 4xx: problem+json, RFC 9457, ``detail`` saying what is wrong)."""
    request_id = accept_or_generate(environ.get("HTTP_X_REQUEST_ID"))
    title = HTTP_STATUS_CODES[status]
    if status == 200:
        fields, body = [("Allow", ", ".join(METHODS)), ("Content-Length", "0")], b""
    else:
        body = problem_document(status, title, detail, "about:blank", request_id)
        fields = [("Content-Type", PROBLEM_JSON), ("Content-Length", str(len(body)))]
    start_response(f"{status} {title.upper()}", [*fields, (HEADER, request_id)])
    return [body]


class ProxyApp:
    """Serves a proxied request through its route. Built once per process from what the
    app's ``init_app`` calls made: the authenticator, the rate limits (``app.ratelimit.RateLimits``,
    handed in, not imported: app.ratelimit builds on this package), the problem type base."""

    def __init__(self, authenticator, limits, problem_base: str):
        self.authenticator = authenticator
        self.limits = limits
        self.problem_base = problem_base  # "/_gateway/problems/"

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        gateway = environ[GATEWAY]
        method = environ["REQUEST_METHOD"].upper()
        path = request_path(environ)
        request_id = accept_or_generate(environ.get("HTTP_X_REQUEST_ID"))
        trace = tracing.accept_or_start(environ.get("HTTP_TRACEPARENT"), environ.get("HTTP_TRACESTATE"))
        # Lines logged while the request is served (a library's too) carry its id.
        id_token, trace_token = work_request_id.set(request_id), tracing.work_trace.set(trace)
        line = {"request_id": request_id, "method": method, "path": path, "route": None, "consumer": None, "target": None, "status": 0, "upstream_ms": None}
        headers = EnvironHeaders(environ)
        counted = None
        greq = None
        allow = asked = None  # the route's CORS policy; the method a preflight asks about
        try:
            if has_dot_segment(path):
                raise BadRequest("The path must not contain '.' or '..' segments")
            raw_path = _raw_path(environ, path)
            # A CORS preflight is matched as the request it asks about; on a route without
            # ``cors`` it is an OPTIONS like any other.
            asked = cors.requested_method(method, headers)
            match = None
            if asked:
                with contextlib.suppress(NotFound, MethodNotAllowed):
                    match = gateway.router.match(asked, path, raw_path, headers)
                if match is None or match.route.cors is None:
                    asked, match = None, None
            if match is None:
                match = gateway.router.match(method, path, raw_path, headers)  # NotFound, MethodNotAllowed
            route = match.route
            line["route"] = route.label
            refuse_ambiguous(route, raw_path)  # 400 ambiguous-path
            if tracing.enabled():
                tracing.name_server_span(f"{method} {route.label}")
            allow = route.cors
            if asked and allow is not None:
                # Answered here, before authentication; the upstream never sees it (403 for
                # an origin not allowed).
                fields = allow.preflight(headers["Origin"], headers.get("Access-Control-Request-Headers"), route.methods)
                response = GatewayResponse(status=204, headers=fields, body=[])
            else:
                principal = self.authenticator.authenticate(headers, route.policy)  # 401, 403, 503
                if principal is not None:
                    line["consumer"] = principal.consumer_id
                client_ip = environ.get("REMOTE_ADDR") or ""  # after ProxyFix: the client's own
                counted = self.limits.count(route, principal, client_ip)  # one storage round trip
                if counted is not None and counted.breached is not None:
                    raise self.limits.rejection(counted, route.label)
                length = get_content_length(environ)
                chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
                scheme = environ["wsgi.url_scheme"]
                greq = GatewayRequest(
                    method=method,
                    path=path,
                    query=environ.get("QUERY_STRING", ""),
                    headers=headers,
                    body=ClientBody(get_input_stream(environ, max_content_length=None), length) if (length or chunked) else None,
                    client_addr=environ.get("werkzeug.proxy_fix.orig", environ).get("REMOTE_ADDR") or "",
                    client_ip=client_ip,
                    scheme=scheme,
                    host=get_host(environ),
                    route=route,
                    params=match.params,
                    upstream_path=match.upstream_path,
                    raw_path=raw_path,
                    request_id=request_id,
                    principal=principal,
                    trace=trace,
                )
                response = match.handler(greq)
        except ProblemError as error:
            response = self.problem(error.status, error.title, error.detail, self.problem_base + error.slug, request_id, error.headers, error.extra)
        except HTTPException as error:
            response = self.http_problem(error, method, path, request_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            response = self.problem(500, "Internal Server Error", "The gateway failed to handle the request", "about:blank", request_id)
        finally:
            work_request_id.reset(id_token)
            tracing.work_trace.reset(trace_token)
        if allow is not None and not asked:
            allow.apply(response.headers, headers.get("Origin"))
        fields = [(HEADER, request_id), *(counted.headers() if counted is not None else ())]
        present = set_fields(response.headers, fields)
        upstream_seconds = None
        if greq is not None and greq.target is not None:
            line["target"] = greq.target
            upstream_seconds = greq.upstream_seconds
            line["upstream_ms"] = round(upstream_seconds * 1000, 3)
        line["status"] = response.status
        cache_status = response.headers.get("Cache-Status") if "cache-status" in present else None
        done = partial(request_done, line, started, line["route"], upstream_seconds, cache_status)
        return send(response, environ, start_response, done, present)

    @staticmethod
    def problem(status: int, title: str, detail: str, type_: str, request_id: str, headers: dict | None = None, extra: dict | None = None) -> GatewayResponse:
        """A problem+json answer (RFC 9457), the proxy's own errors and its upstreams'."""
        body = problem_document(status, title, detail, type_, request_id, **(extra or {}))
        fields = Headers([("Content-Type", PROBLEM_JSON), ("Content-Length", str(len(body)))])
        for name, value in (headers or {}).items():
            fields[name] = value
        return GatewayResponse(status=status, headers=fields, body=[body])

    def http_problem(self, error: HTTPException, method: str, path: str, request_id: str) -> GatewayResponse:
        """404 (no route), 405 (with ``Allow``, RFC 9110 section 15.5.6) or 400, as the Flask
        app words them (app.errors.handle_http_exception)."""
        detail = error.description or error.name
        headers = {}
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            headers["Allow"] = allowed = ", ".join(sorted(error.valid_methods))
            detail = f"{method} is not allowed on {path}; allowed: {allowed}"
        elif isinstance(error, NotFound) and error.description == NotFound.description:
            detail = f"No route matches {path}"
        return self.problem(error.code or 500, error.name, detail, "about:blank", request_id, headers)


def set_fields(headers: Headers, fields: list[tuple[str, str]]) -> set[str]:
    """Set ``fields`` on ``headers``, replacing those of the same names, in one pass over them
    (werkzeug's ``headers[name] = value`` scans them once per name); return the lower-case
    names ``headers`` then holds."""
    names = {name.lower() for name, _ in fields}
    present = {name.lower() for name in headers.keys()}  # noqa: SIM118 (iterating Headers gives pairs)
    for name in names & present:
        del headers[name]
    add = headers.add  # not extend: see types.new_headers
    for name, value in fields:
        add(name, value)
    return present | names


def send(response: GatewayResponse, environ: dict, start_response: Callable, done: Callable[[], None], present: set[str]) -> Iterable[bytes]:
    """Start ``response`` and return its body; closing it closes the upstream's (pool release,
    bulkhead slot) and then runs ``done``. ``present``: the lower-case names of its fields.
    What werkzeug's ``Response`` does for a WSGI answer: the common case here, the rest (HEAD,
    1xx, 204, 304, Location fields) through it."""
    status, headers = response.status, response.headers
    if environ["REQUEST_METHOD"] == "HEAD" or status < 200 or status in (204, 304) or not _locations_are_uris(headers, present):
        # Not direct_passthrough: werkzeug would then hand the bare iterator to the server and
        # never run the call_on_close callbacks.
        wrapped = Response(response.body, status=status)
        wrapped.headers = headers  # as they are: no copy, and no text/html werkzeug would default to
        wrapped.call_on_close(response.close)
        wrapped.call_on_close(done)
        return wrapped(environ, start_response)
    fields = headers.to_wsgi_list()
    body = response.body
    if isinstance(body, list | tuple) and "content-length" not in present:
        fields.append(("Content-Length", str(sum(len(chunk) for chunk in body))))
    start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'unknown').upper()}", fields)
    return ClosingIterator(body, [response.close, done])


# The characters a URI is made of (RFC 3986 section 2): werkzeug's Response sends a Location or
# Content-Location of only these as it is (its iri_to_uri quotes anything else).
_URI = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


def _locations_are_uris(headers: Headers, present: set[str]) -> bool:
    """Whether ``headers`` (lower-case names ``present``) hold no Location or Content-Location
    that werkzeug's Response would rewrite: such an answer is sent without one (a job's 202)."""
    if "location" not in present and "content-location" not in present:
        return True
    return all(_URI.fullmatch(value) for name, value in headers.items() if name.lower() in ("location", "content-location"))


def _raw_path(environ: dict, path: str) -> str:
    """The path as the client sent it, still percent-encoded: gunicorn's RAW_URI, whose
    absolute form (``GET http://host/x``, RFC 9112 section 3.2.2) is cut to its path."""
    raw = environ.get("RAW_URI", "")
    if raw and not raw.startswith("/"):
        raw = urlsplit(raw).path
    return raw.split("?", 1)[0] or quote(path)
