"""Assembly: one place that builds each route's pipeline from its stages, in order."""
from __future__ import annotations

from dataclasses import dataclass, field

import redis
from requests.adapters import HTTPAdapter

from app.gateway.aggregate import Part, aggregate, shared_pool
from app.gateway.balancer import balance
from app.gateway.body import request_body
from app.gateway.breaker import TargetBreakers
from app.gateway.bulkhead import Slots, bulkhead, new_slots
from app.gateway.cache import CacheRules, cache, route_key
from app.gateway.cachestore import CacheStore
from app.gateway.fields import FieldRules
from app.gateway.forward import forward, new_adapter
from app.gateway.headers import forwarding_headers
from app.gateway.idempotency import IdempotencyRules, idempotency
from app.gateway.retry import retry
from app.gateway.routefile import BodyRules, Cache, Route, RouteFile, Timeout, Upstream
from app.gateway.router import Router
from app.gateway.transform import transform
from app.gateway.types import Handler, Middleware


@dataclass
class UpstreamRuntime:
    """What the routes of one upstream share: its connection pool, breakers and bulkhead."""

    name: str
    config: Upstream
    adapter: HTTPAdapter
    breakers: TargetBreakers
    slots: Slots | None

    def close(self) -> None:
        self.adapter.close()


@dataclass(frozen=True)
class Settings:
    """Process-wide settings the stages need (from app.config)."""

    max_body_size: int  # bytes; 0: no limit
    buffer_body_size: int  # bytes
    pool_size: int  # connections kept per target
    via_name: str
    key_prefix: str
    breaker_sync_interval: float = 0.0  # seconds a process may act on a kept breaker reading
    cache_store: CacheStore | None = None  # where routes with ``cache:`` keep answers
    cache_lock_wait: float = 5.0  # seconds concurrent misses wait for the first one
    aggregate_threads: int = 32  # the process's pool for aggregate routes' backend calls
    # Breakers (``upstream:target``) an operator holds open; one set per process, kept across
    # reloads and brought in step with the other processes by app.gateway.control.
    held_open: set[str] = field(default_factory=set)


def build_upstreams(
    route_file: RouteFile,
    settings: Settings,
    redis_client: redis.Redis | None,
    previous: dict[str, UpstreamRuntime] | None = None,
) -> dict[str, UpstreamRuntime]:
    """Create each upstream's shared runtime: at start-up, and on a reload.

    On a reload (``previous``: the running ones) an upstream whose settings are unchanged
    keeps its runtime: its pooled connections, its bulkhead's slots (in-flight requests of
    the old config count against the new one) and, without Redis, its breakers' state.
    """
    previous = previous or {}
    return {
        name: previous[name] if name in previous and previous[name].config == config else _new_upstream(name, config, settings, redis_client)
        for name, config in route_file.upstreams.items()
    }


def _new_upstream(name: str, config: Upstream, settings: Settings, redis_client: redis.Redis | None) -> UpstreamRuntime:
    return UpstreamRuntime(
        name=name,
        config=config,
        adapter=new_adapter(len(config.targets), settings.pool_size),
        breakers=TargetBreakers(
            name,
            config.targets,
            config.breaker,
            redis_client,
            settings.key_prefix,
            settings.breaker_sync_interval,
            probe_ttl=config.timeout.connect + config.timeout.read,
            held_open=settings.held_open,
        ),
        slots=new_slots(config.max_concurrency),
    )


def assemble(route: Route, upstream: UpstreamRuntime, settings: Settings, for_job: bool = False) -> Handler:
    """Build ``route``'s handler, outermost stage first:

    0. a ``mode: async`` route served to a client is only the body stage (the whole body,
       up to the limit, is kept with the job) and then the job's submission (202). The
       worker later calls the handler built with ``for_job``: the stages below, with the
       upstream's ``job_timeout`` in place of its ``timeout``.

    1. body: a too-large body is refused (413) before any other work is spent on it, and a
       small one is buffered so the retry stage can resend it.
    2. idempotency and cache: a replay or a hit is answered before anything else is spent on it; what is stored is
       what the client gets (after the transform and header stages), and a stale entry can
       stand in for any failure below.
    3. transform: the route's own header rules act on what the client sent, before the
       gateway's forwarding fields are added; on the way back it sees the response after
       hop-by-hop removal, and filters JSON fields once, not per attempt.
    4. headers: hop-by-hop removal and X-Forwarded-*/Via happen once per client request,
       not once per attempt.
    5. bulkhead: one slot per client request, held across its retries, so retries cannot
       push an upstream past ``max_concurrency``.
    6. retry: outside the balancer, so each attempt goes to the next target whose breaker
       allows it, and each attempt's outcome feeds that target's breaker.
    7. balancer + breaker: pick the target, record the outcome.
    8. forward: the pooled HTTP call.
    Stages a route does not use (no bulkhead, one attempt) are not in its pipeline.
    """
    config = upstream.config
    max_body = settings.max_body_size if route.max_body_size is None else route.max_body_size
    if route.mode == "async" and not for_job:
        from app.jobs import (
            accept,  # the jobs domain needs the app's models; the pipeline does not
        )

        return request_body(max_body, max_body or settings.max_body_size)(accept)
    drop_credentials = route.auth != "none" and not route.forward_credentials
    timeout = config.job_timeout if for_job else config.timeout
    handler = upstream_call(upstream, timeout, settings.via_name, drop_credentials)
    handler = route_transform(route)(handler)
    if not for_job:  # a job's answer is its own stored result, and jobs have their own keys
        handler = route_cache(route, settings)(handler)
        keep = route.idempotency
        rules = IdempotencyRules(keep.ttl, keep.max_size, keep.in_flight) if keep else None
        handler = idempotency(route_key(route.label, route.match_headers), rules, settings.cache_store, settings.key_prefix)(handler)
    # A route that keeps answers by request holds the whole body, to compare repeats with it.
    buffer = (max_body or settings.max_body_size or 10 * 1024 * 1024) if route.idempotency else settings.buffer_body_size
    handler = request_body(max_body, buffer)(handler)
    return handler


def upstream_call(upstream: UpstreamRuntime, timeout: Timeout, via_name: str, drop_credentials: bool) -> Handler:
    """Stages 4-8 for one upstream: headers, bulkhead, retry, balancer + breaker, forward.
    A plain route and each call of an aggregate route go through the same ones."""
    config = upstream.config
    handler = forward(upstream.adapter, timeout)
    handler = balance(upstream.name, config.targets, upstream.breakers)(handler)
    handler = retry(config.retries)(handler)
    handler = bulkhead(upstream.name, upstream.slots)(handler)
    return forwarding_headers(via_name, drop_credentials)(handler)


def route_transform(route: Route) -> Middleware:
    """The route's header and JSON field rules (no stage when it has none)."""
    return transform(
        route.request_headers.as_rules() if route.request_headers else None,
        route.response_headers.as_rules() if route.response_headers else None,
        field_rules(route.response_body),
        route.response_body.max_size if route.response_body else 0,
    )


def route_cache(route: Route, settings: Settings) -> Middleware:
    """The route's response cache (no stage without ``cache:``)."""
    return cache(route_key(route.label, route.match_headers), cache_rules(route.cache), settings.cache_store, settings.key_prefix, settings.cache_lock_wait)


def cache_rules(config: Cache | None) -> CacheRules | None:
    if config is None:
        return None
    return CacheRules(config.ttl, config.public, config.stale_if_error, config.max_size)


def field_rules(rules: BodyRules | None) -> FieldRules:
    """The JSON field rules of a route file's ``response_body`` (none: no rules)."""
    if rules is None:
        return FieldRules()
    return FieldRules(rules.allow, rules.deny, tuple(rules.rename.items()))


def handler_for(route: Route, upstreams: dict[str, UpstreamRuntime], settings: Settings, for_job: bool = False) -> Handler:
    """``route``'s handler: its upstream's pipeline, or an aggregate of its calls."""
    if route.aggregate is None:
        return assemble(route, upstreams[route.upstream], settings, for_job)
    return assemble_aggregate(route, upstreams, settings)


def assemble_aggregate(route: Route, upstreams: dict[str, UpstreamRuntime], settings: Settings) -> Handler:
    """An aggregate route: each call gets its upstream's header, bulkhead, retry, breaker and
    forward stages (the call's ``timeout`` as the read timeout), and the merge runs them on
    the process's shared pool. The route's transform and cache wrap the merged answer."""
    parts = []
    for name, call in (route.aggregate or {}).items():
        upstream = upstreams[call.upstream]
        config = upstream.config
        # No call waits longer than the whole route may: an abandoned call holds a pool thread.
        read = min(config.timeout.read if call.timeout is None else call.timeout, route.timeout)
        timeout = Timeout(connect=min(config.timeout.connect, route.timeout), read=read)
        handler = upstream_call(upstream, timeout, settings.via_name, drop_credentials=True)
        rules = FieldRules(call.allow, call.deny, tuple(call.rename.items()))
        parts.append(Part(name, call.method, call.path, handler, call.required, call.depends_on, call.timeout, call.list_format, rules))
    handler = aggregate(parts, route.aggregate_mode == "all", route.timeout, lambda: shared_pool(settings.aggregate_threads))
    handler = route_transform(route)(handler)
    handler = route_cache(route, settings)(handler)
    return request_body(settings.max_body_size, settings.buffer_body_size)(handler)


def build_router(route_file: RouteFile, upstreams: dict[str, UpstreamRuntime], settings: Settings) -> Router:
    """Assemble every route's pipeline and the router that picks among them."""
    return Router([(route, handler_for(route, upstreams, settings)) for route in route_file.routes])
