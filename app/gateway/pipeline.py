"""Assembly: one place that builds each route's pipeline from its stages, in order."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from app.gateway import (
    balancer,
    body,
    bulkhead,
    cache,
    forward,
    headers,
    idempotency,
    retry,
    transform,
)
from app.gateway.aggregate import AggregateCall, Part, aggregate, shared_pool
from app.gateway.breaker import TargetBreakers
from app.gateway.cachestore import CacheStore
from app.gateway.fields import FieldRules
from app.gateway.forward import TargetPools, Timeout
from app.gateway.routefile import Route, RouteFile, Upstream
from app.gateway.router import Router
from app.gateway.types import Handler, Middleware


@dataclass
class UpstreamRuntime:
    """What the routes of one upstream share: its connection pool, breakers and bulkhead."""

    name: str
    config: Upstream
    pools: TargetPools
    breakers: TargetBreakers
    slots: bulkhead.Slots | None

    def close(self) -> None:
        self.pools.close()


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
    # A ``mode: async`` route's handler: the jobs domain's submission (202), which it registers.
    submit_job: Handler | None = None


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
        pools=TargetPools(name, config.targets, settings.pool_size, config.tls),
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
        slots=bulkhead.new_slots(config.max_concurrency),
    )


@dataclass(frozen=True)
class Context:
    """What a stage's ``build`` reads: the route, the process's settings, and for the upstream
    stages the upstream's runtime and the timeout of this call (``call``: the aggregate call
    being built, None for a plain route). ``for_job``: the pipeline a job's worker runs."""

    route: Route
    settings: Settings
    upstream: UpstreamRuntime | None = None
    timeout: Timeout | None = None
    for_job: bool = False
    call: AggregateCall | None = None


# A route's stages, outermost first; each module's ``build(ctx)`` returns its Middleware, or
# ``unchanged`` when the route does not use it. Why this order:
# - body: a too-large body is refused (413) before any other work is spent on it, and a small
#   one is buffered so that a retry can resend it.
# - idempotency, cache: a replay or a hit is answered before anything else is spent on it;
#   what is stored is what the client gets (after transform and headers), and a stale entry
#   can stand in for any failure below.
# - transform: the route's own header rules act on what the client sent, before the gateway's
#   forwarding fields are added; on the way back it sees the answer after hop-by-hop removal,
#   and filters JSON fields once, not per attempt.
ROUTE_STAGES = (body.build, idempotency.build, cache.build, transform.build)
# An aggregate route's: its calls' answers are merged, then filtered and cached as one.
AGGREGATE_STAGES = (body.build, cache.build, transform.build)
# One upstream call's stages, outermost first, then forward (the pooled HTTP call):
# - headers: hop-by-hop removal and X-Forwarded-*/Via happen once per client request, not
#   once per attempt.
# - bulkhead: one slot per client request, held across its retries, so retries cannot push an
#   upstream past ``max_concurrency``.
# - retry: outside the balancer, so each attempt goes to the next target whose breaker allows
#   it, and each attempt's outcome feeds that target's breaker.
# - balancer + breaker: pick the target, record the outcome.
UPSTREAM_STAGES = (headers.build, bulkhead.build, retry.build, balancer.build)


def wrapped(handler: Handler, stages: tuple[Callable[[Context], Middleware], ...], ctx: Context) -> Handler:
    """``handler`` inside ``stages`` (outermost first), each built from ``ctx``."""
    for build in reversed(stages):
        handler = build(ctx)(handler)
    return handler


def assemble(route: Route, upstream: UpstreamRuntime, settings: Settings, for_job: bool = False) -> Handler:
    """``route``'s handler: ROUTE_STAGES around UPSTREAM_STAGES around forward.

    A ``mode: async`` route served to a client is only the body stage (the whole body, up to
    the limit, is kept with the job) and then the job's submission (202). The worker later
    runs the pipeline built with ``for_job``: the stages above, with the upstream's
    ``job_timeout`` in place of its ``timeout``, and no cache or idempotency stage.
    """
    if route.mode == "async" and not for_job:
        return body.build(Context(route, settings))(settings.submit_job)
    config = upstream.config
    ctx = Context(route, settings, upstream, config.job_timeout if for_job else config.timeout, for_job)
    return wrapped(upstream_call(ctx), ROUTE_STAGES, ctx)


def upstream_call(ctx: Context) -> Handler:
    """UPSTREAM_STAGES around forward, for one upstream: a plain route and each call of an
    aggregate route go through the same ones."""
    return wrapped(forward.build(ctx), UPSTREAM_STAGES, ctx)


def handler_for(route: Route, upstreams: dict[str, UpstreamRuntime], settings: Settings, for_job: bool = False) -> Handler:
    """``route``'s handler: its upstream's pipeline, or an aggregate of its calls."""
    if route.aggregate is None:
        return assemble(route, upstreams[route.upstream], settings, for_job)
    return assemble_aggregate(route, upstreams, settings)


def assemble_aggregate(route: Route, upstreams: dict[str, UpstreamRuntime], settings: Settings) -> Handler:
    """An aggregate route: each call gets its upstream's UPSTREAM_STAGES and forward (the
    call's ``timeout`` as the read timeout), and the merge runs them on the process's shared
    pool, inside AGGREGATE_STAGES."""
    parts = []
    for name, call in (route.aggregate or {}).items():
        upstream = upstreams[call.upstream]
        config = upstream.config
        # No call waits longer than the whole route may: an abandoned call holds a pool thread.
        read = min(config.timeout.read if call.timeout is None else call.timeout, route.timeout)
        timeout = Timeout(connect=min(config.timeout.connect, route.timeout), read=read)
        handler = upstream_call(Context(route, settings, upstream, timeout, call=call))
        rules = FieldRules(call.allow, call.deny, tuple(call.rename.items()))
        parts.append(Part(name, call.method, call.path, handler, call.required, call.depends_on, call.timeout, call.list_format, rules))
    merged = aggregate(parts, route.aggregate_mode == "all", route.timeout, lambda: shared_pool(settings.aggregate_threads))
    return wrapped(merged, AGGREGATE_STAGES, Context(route, settings))


def build_router(route_file: RouteFile, upstreams: dict[str, UpstreamRuntime], settings: Settings) -> Router:
    """Assemble every route's pipeline and the router that picks among them."""
    return Router([(route, handler_for(route, upstreams, settings)) for route in route_file.routes])
