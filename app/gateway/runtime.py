"""The running gateway: the loaded route file and every route's pipeline built from it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import Flask

from app.extensions import redis_client
from app.gateway import control, pipeline, routefile
from app.gateway.cachestore import MemoryStore, RedisStore
from app.gateway.router import Router
from app.gateway.types import Handler


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
    if client is not None:
        store = RedisStore(client, MemoryStore(int(config["CACHE_NEAR_MAX_BYTES"])), float(config["CACHE_NEAR_TTL"]))
    else:
        store = MemoryStore(int(config["CACHE_MAX_BYTES"]))
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
        # Looked up per submission: the jobs domain registers it after the gateway is built.
        submit_job=lambda req: app.extensions["job_submit"](req),
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
    app.extensions["ratelimit"].prepare(route_file.routes)  # every limit string parsed now
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
    """The Gateway the current request of the Flask app started on (taken by the entry)."""
    from flask import current_app, request

    from app.gateway.proxy import GATEWAY

    return request.environ.get(GATEWAY) or current(current_app)


def served_routes(gateway: Gateway) -> list[dict]:
    """The routes of ``gateway``'s route file, in the file's order, as the admin API and
    ``flask gateway routes`` show them."""
    return [
        {
            "index": index,
            "name": route.name,
            "label": route.label,
            "path": route.path,
            "methods": list(route.methods) if route.methods else None,
            "upstream": route.upstream,
            "aggregate": {name: call.upstream for name, call in route.aggregate.items()} if route.aggregate else None,
            "mode": route.mode,
            "auth": route.auth,
            "scopes": list(route.scopes),
            "strip_prefix": route.strip_prefix,
            "match_headers": dict(route.match_headers),
            "rate_limit": route.rate_limit,
            "cache_ttl": route.cache.ttl if route.cache else None,
        }
        for index, route in enumerate(gateway.route_file.routes)
    ]
