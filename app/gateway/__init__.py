"""The proxy: loads the route file, builds every route's pipeline, and serves non-reserved paths."""
from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import quote, urlsplit

from celery.signals import worker_init
from flask import Flask, appcontext_pushed, current_app, g, request
from werkzeug.exceptions import BadRequest, HTTPException, MethodNotAllowed, NotFound
from werkzeug.wrappers import Response

from app.extensions import redis_client
from app.gateway import control, pipeline, routefile
from app.gateway.body import ClientBody
from app.gateway.cachestore import MemoryStore, RedisStore
from app.gateway.router import Router, has_dot_segment
from app.gateway.types import GatewayRequest, GatewayResponse, Handler

# The environ key of a route match the cache fast path made (a server never sets it, and a
# client's headers arrive as HTTP_* keys, so none can forge it).
MATCHED = "frontdoor.match"
# The environ key of the Gateway a request started on: it finishes on it, reload or not.
GATEWAY = "frontdoor.gateway"
# Every method a client may proxy; TRACE and CONNECT are not forwarded.
PROXIED_METHODS = list(routefile.METHODS)


@dataclass
class Gateway:
    """The loaded route file and what was built from it, kept in ``app.extensions["gateway"]``."""

    route_file: routefile.RouteFile
    upstreams: dict[str, pipeline.UpstreamRuntime]
    router: Router
    reserved: frozenset[str]  # the gateway's own paths (/_gateway, /healthz, ...)
    reserved_below: tuple[str, ...]  # the same with a trailing "/", for str.startswith
    settings: pipeline.Settings
    digest: str = ""  # SHA-256 of the route file's bytes, as validated
    loaded_at: float = field(default_factory=time.time)  # epoch seconds
    job_handlers: dict[int, Handler] = field(default_factory=dict)  # by id(route), built on first use
    # The cache fast path's hit lookups by id(route) (app.gateway.fastpath), made on first use.
    fast_lookups: dict[int, Callable] | None = None

    def job_handler(self, route: routefile.Route) -> Handler:
        """``route``'s pipeline as a job's worker runs it (``job_timeout``, no submission)."""
        handler = self.job_handlers.get(id(route))
        if handler is None:
            handler = pipeline.handler_for(route, self.upstreams, self.settings, for_job=True)
            self.job_handlers[id(route)] = handler
        return handler

    def is_reserved(self, path: str) -> bool:
        """True on or under a reserved path: /healthz and /healthz/x, not /healthzx."""
        return path in self.reserved or path.startswith(self.reserved_below)


def settings_from(app: Flask) -> pipeline.Settings:
    config = app.config
    client = redis_client(app)
    store = RedisStore(client) if client is not None else MemoryStore(int(config["CACHE_MAX_BYTES"]))
    return pipeline.Settings(
        max_body_size=int(config["MAX_BODY_SIZE"]),
        buffer_body_size=int(config["BUFFER_BODY_SIZE"]),
        pool_size=int(config["WEB_THREADS"]),
        via_name=config["VIA_NAME"],
        key_prefix=config["KEY_PREFIX"],
        breaker_sync_interval=float(config["BREAKER_SYNC_INTERVAL"]),
        cache_store=store,
        cache_lock_wait=float(config["CACHE_LOCK_WAIT"]),
        aggregate_threads=int(config["AGGREGATE_THREADS"]),
    )


def load_gateway(app: Flask) -> Gateway:
    """Load and validate ``GATEWAY_CONFIG`` and build the pipelines; raises RouteFileError."""
    route_file, digest = control.read_route_file(app.config["CONFIG"], app.config["API_PREFIX"])
    return build_gateway(app, route_file, digest)


def build_gateway(app: Flask, route_file: routefile.RouteFile, digest: str, running: Gateway | None = None) -> Gateway:
    """Build every pipeline of a validated route file.

    On a reload (``running``: the Gateway serving now) the process-wide settings (the cache
    store, the breakers held open) are kept, and so is each upstream whose settings did not
    change (pool, bulkhead, breakers): see ``pipeline.build_upstreams``.
    """
    settings = running.settings if running is not None else settings_from(app)
    upstreams = pipeline.build_upstreams(route_file, settings, redis_client(app), running.upstreams if running else None)
    reserved = (app.config["API_PREFIX"].rstrip("/"), *routefile.RESERVED_PATHS)
    router = pipeline.build_router(route_file, upstreams, settings)
    return Gateway(route_file, upstreams, router, frozenset(reserved), tuple(path + "/" for path in reserved), settings, digest)


def current(app: Flask) -> Gateway:
    """The Gateway a request should use now: ``app.extensions["gateway"]``, after applying a
    reload or a breaker change made in another process when one is due to be looked for
    (every CONTROL_SYNC_INTERVAL seconds; in between this costs a clock read)."""
    return app.extensions["gateway_control"].current()


def request_gateway() -> Gateway:
    """The Gateway the current request started on (taken by the outermost WSGI layer)."""
    return request.environ.get(GATEWAY) or current(current_app)


def route_request() -> None:
    """before_request: match a proxied path to its route, so that authentication and rate
    limiting, which run next, know the route's policy and limit. Raises 404, 405 or 400."""
    client = request._get_current_object()
    if client.endpoint != "proxy":
        return
    gateway: Gateway = client.environ.get(GATEWAY) or current(current_app)
    path = client.path
    if gateway.is_reserved(path):
        # The gateway's own space: never proxied to a broad route such as "/". A path of its own
        # asked with a method it does not take is a 405 naming those it does (RFC 9110 15.5.6).
        allowed = own_methods(path)
        if allowed:
            raise MethodNotAllowed(valid_methods=allowed)
        raise NotFound()
    if has_dot_segment(path):
        raise BadRequest("The path must not contain '.' or '..' segments")
    ctx = g._get_current_object()
    ctx.raw_path = raw_path = _raw_path(client.environ, path)
    # The cache fast path may have matched this request already (same environ, same request).
    match = client.environ.get(MATCHED) or gateway.router.match(client.method, path, raw_path, client.headers)
    ctx.match = match
    ctx.route = match.route.label


def own_methods(path: str) -> list[str]:
    """The methods the gateway's own URL rules (not the proxy's catch-all) take on ``path``."""
    adapter = current_app.url_map.bind("", url_scheme=request.scheme)
    allowed = []
    for method in PROXIED_METHODS:
        try:
            endpoint, _ = adapter.match(path, method=method)
        except HTTPException:
            continue
        if endpoint != "proxy":
            allowed.append(method)
    return allowed


def proxy(path: str = "") -> Response:
    """Serve any path outside the reserved ones through its matched route's pipeline."""
    # Each access through flask.request / flask.g is a context-local lookup: take the objects once.
    client = request._get_current_object()
    ctx = g._get_current_object()
    environ = client.environ
    match = ctx.match
    headers = client.headers
    length = client.content_length
    chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
    greq = GatewayRequest(
        method=client.method,
        path=client.path,
        query=environ.get("QUERY_STRING", ""),
        headers=headers,
        body=ClientBody(client.stream, length) if (length or chunked) else None,
        client_addr=environ.get("werkzeug.proxy_fix.orig", environ).get("REMOTE_ADDR") or "",
        scheme=client.scheme,
        host=client.host,
        route=match.route,
        params=match.params,
        upstream_path=match.upstream_path,
        raw_path=ctx.raw_path,
        request_id=ctx.request_id,
        principal=ctx.get("principal"),
    )
    try:
        upstream_response = match.handler(greq)
    finally:
        ctx.target = greq.target
        ctx.upstream_seconds = greq.upstream_seconds
    return to_flask(upstream_response)


def _raw_path(environ: dict, path: str) -> str:
    """The path as the client sent it, still percent-encoded: gunicorn's RAW_URI, whose
    absolute form (``GET http://host/x``, RFC 9112 section 3.2.2) is cut to its path."""
    raw = environ.get("RAW_URI", "")
    if raw and not raw.startswith("/"):
        raw = urlsplit(raw).path
    return raw.split("?", 1)[0] or quote(path)


def to_flask(upstream: GatewayResponse) -> Response:
    """Wrap a GatewayResponse for WSGI without reading its body; closing it closes the upstream's."""
    # Not direct_passthrough: werkzeug would then hand the bare iterator to the server and
    # never run the call_on_close callbacks (pool release, bulkhead slot, access log).
    response = Response(upstream.body, status=upstream.status)
    # The upstream's headers as they are: no copy, and no text/html werkzeug would default to.
    response.headers = upstream.headers
    response.call_on_close(upstream.close)
    return response


def init_app(app: Flask) -> None:
    """Build the gateway from the route file and route every other path to it.

    Raises RouteFileError when the file is invalid: a gateway never serves half a config.
    ``app.extensions["gateway_control"]`` applies reloads and breaker holds made anywhere
    (``app.gateway.control``); the cache fast path, the outermost layer, asks it first.
    """
    app.extensions["gateway"] = load_gateway(app)
    store = control.store_for(app, redis_client(app))
    app.extensions["gateway_control"] = control.Control(
        app, store, float(app.config["CONTROL_SYNC_INTERVAL"]), lambda route_file, digest, running: build_gateway(app, route_file, digest, running)
    )
    # A Celery worker runs jobs through the gateway too: it looks for changes as each task
    # pushes the app context (web processes look on each request, in the outermost layer).
    worker_init.connect(partial(_follow_in_worker, weakref.ref(app)), weak=False)
    app.before_request(route_request)
    app.add_url_rule("/", "proxy", proxy, methods=PROXIED_METHODS, provide_automatic_options=False)
    app.add_url_rule("/<path:path>", "proxy", proxy, methods=PROXIED_METHODS, provide_automatic_options=False)


def _follow_in_worker(app_ref: weakref.ref, **_: object) -> None:
    """worker_init: in a Celery worker, look for reloads and breaker holds made elsewhere
    whenever a task pushes the app context (at most every CONTROL_SYNC_INTERVAL seconds)."""
    app = app_ref()
    if app is not None:
        appcontext_pushed.connect(_look_for_changes, app)


def _look_for_changes(sender: Flask, **_: object) -> None:
    sender.extensions["gateway_control"].current()
