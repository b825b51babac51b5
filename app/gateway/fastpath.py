"""Cache fast path: a fresh public cache hit answered in front of the Flask app, before its hooks.

Only where nothing the hooks do could change the answer: a GET or HEAD without a body or a
credential, to a route with ``cache: {public: true}`` that an anonymous caller may use
(``auth: none`` or ``optional``) and that no rate limit applies to for one. Everything else,
and every miss, goes to the app as before; the answer and the access line are the ones the app
would have given (tested side by side), so the fast path changes nothing but the cost.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from functools import partial

from flask import Flask
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.wsgi import ClosingIterator

from app.gateway import GATEWAY, MATCHED, Gateway, _raw_path, to_flask
from app.gateway.cache import fresh_hit, route_key
from app.gateway.pipeline import cache_rules
from app.gateway.request_id import HEADER, accept_or_generate
from app.gateway.router import has_dot_segment
from app.gateway.types import GatewayRequest, GatewayResponse
from app.observability.logging import request_done

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


class TakeGateway:
    """WSGI middleware, the outermost layer of the app: takes the running Gateway for the
    request (``environ[GATEWAY]``), so that the request finishes on it even if a reload swaps
    another in meanwhile, and looks for changes made in other processes when one is due."""

    def __init__(self, app: Flask, wsgi_app: WSGIApp):
        self.app, self.wsgi_app = app, wsgi_app
        self.control = app.extensions["gateway_control"]

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        environ[GATEWAY] = self.control.current()
        return self.wsgi_app(environ, start_response)


class CacheFastPath(TakeGateway):
    """TakeGateway, and fresh public hits answered from the Gateway's ``fast_lookups``
    (``id(route)`` to the route's hit lookup, eligible routes only); anything it does not
    answer goes to ``wsgi_app``."""

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        environ[GATEWAY] = gateway = self.control.current()
        lookups = gateway.fast_lookups
        if lookups is None:
            lookups = gateway.fast_lookups = lookups_for(self.app, gateway)
        if (
            not lookups
            or environ["REQUEST_METHOD"] not in ("GET", "HEAD")
            or environ.get("CONTENT_LENGTH") not in (None, "", "0")
            or "HTTP_TRANSFER_ENCODING" in environ
            or "HTTP_AUTHORIZATION" in environ
            or "HTTP_X_API_KEY" in environ
        ):
            return self.wsgi_app(environ, start_response)
        started = time.perf_counter()
        answer = self._hit(environ, gateway, lookups)
        if answer is None:
            return self.wsgi_app(environ, start_response)
        response, route, request_id, method, path = answer
        response.headers[HEADER] = request_id
        log_fields = {
            "request_id": request_id,
            "method": method,
            "path": path,
            "route": route,
            "consumer": None,
            "target": None,
            "status": response.status,
            "upstream_ms": None,
        }
        return ClosingIterator(_send(response, environ, start_response), [response.close, partial(request_done, log_fields, started, route, None, response.headers.get("Cache-Status"))])

    def _hit(self, environ: dict, gateway: Gateway, lookups: dict[int, Callable]):
        """``(response, route label, request id, method, path)`` for a fresh hit, else None."""
        client = self.app.request_class(environ)
        path = client.path
        if gateway.is_reserved(path) or has_dot_segment(path):
            return None
        raw_path = _raw_path(environ, path)
        try:
            match = gateway.router.match(client.method, path, raw_path, client.headers)
        except HTTPException:
            return None  # 404, 405: the app answers them
        environ[MATCHED] = match  # a miss goes on to the app, which need not match it again
        lookup = lookups.get(id(match.route))
        if lookup is None:
            return None
        request_id = accept_or_generate(environ.get("HTTP_X_REQUEST_ID"))
        req = GatewayRequest(
            method=client.method,
            path=path,
            query=environ.get("QUERY_STRING", ""),
            headers=client.headers,
            scheme=client.scheme,
            host=client.host,
            route=match.route,
            raw_path=raw_path,
            request_id=request_id,
        )
        hit = lookup(req)
        if hit is None:
            return None
        return hit, match.route.label, request_id, client.method, path


def _send(response: GatewayResponse, environ: dict, start_response: Callable) -> Iterable[bytes]:
    """Start ``response`` as werkzeug would for the app (``Response.get_wsgi_headers``): the
    common case directly, the rest (1xx, 204, 304, Location fields to rewrite) through it."""
    status, headers = response.status, response.headers
    if status < 200 or status in (204, 304) or "Location" in headers or "Content-Location" in headers:
        return to_flask(response)(environ, start_response)
    fields = headers.to_wsgi_list()
    if "Content-Length" not in headers:
        fields.append(("Content-Length", str(sum(len(chunk) for chunk in response.body))))
    start_response(f"{status} {HTTP_STATUS_CODES.get(status, 'unknown').upper()}", fields)
    return response.body


def wrap(app: Flask, wsgi_app: WSGIApp) -> WSGIApp:
    """``wsgi_app`` behind the fast path, or behind TakeGateway alone when no route of the
    start-up route file qualifies. (A reload that brings the first qualifying route serves its
    hits through the app until a restart: the same answers, at the app's cost.)"""
    gateway: Gateway = app.extensions["gateway"]
    gateway.fast_lookups = lookups_for(app, gateway)
    return (CacheFastPath if gateway.fast_lookups else TakeGateway)(app, wsgi_app)


def lookups_for(app: Flask, gateway: Gateway) -> dict[int, Callable]:
    """The hit lookups of ``gateway``'s routes that qualify for the fast path, by ``id(route)``.

    A route qualifies with a public ``cache:``, ``auth: none`` or ``optional``, not async, and
    no rate limit for an anonymous caller (its own ``rate_limit``, the ``anonymous`` plan or
    RATELIMIT_DEFAULT).
    """
    policies = app.extensions["ratelimit"]
    settings = gateway.settings
    lookups: dict[int, Callable] = {}
    for route in gateway.route_file.routes:
        rules = cache_rules(route.cache)
        if (
            rules is None
            or not rules.public
            or route.auth == "required"
            or route.mode == "async"
            or policies.choose(route, None)[1]
        ):
            continue
        lookups[id(route)] = partial(fresh_hit, route_key(route.label, route.match_headers), rules, settings.cache_store, settings.key_prefix)
    return lookups
