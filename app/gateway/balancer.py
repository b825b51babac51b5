"""Balancer stage: round robin over an upstream's targets, skipping those whose breaker is open."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from app.gateway.breaker import (
    CLOSED,
    Reading,
    TargetBreakers,
    TargetFailure,
    retry_after,
)
from app.gateway.types import (
    BreakerOpen,
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    UpstreamUnreachable,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context


def balance(upstream: str, targets: tuple[str, ...], breakers: TargetBreakers) -> Middleware:
    """Build the balancer stage for one upstream.

    Each call picks the next target in turn whose breaker is closed, or open long enough
    that this request can be its one half-open probe; a retry prefers targets the request
    has not tried. It sets ``req.target`` and records the outcome with that target's
    breaker: connection errors, timeouts and the breaker's ``failure_statuses`` count as
    failures. Raises BreakerOpen (503, ``Retry-After`` = seconds until the first breaker
    lets a probe through) when no target can be used.
    """
    turn = itertools.count()  # next() on a count is atomic under the GIL
    failure_statuses = frozenset(breakers.config.failure_statuses)
    size = len(targets)

    def pick(tried: set[str]) -> tuple[str, Reading]:
        start = next(turn)
        order = [targets[(start + offset) % size] for offset in range(size)]
        if tried:  # a retry goes to a target not yet tried for this request, while one is left
            order.sort(key=tried.__contains__)
        waits = []
        for target in order:
            reading = breakers.read(target)
            wait = breakers.open_for(target, reading)
            if wait > 0:
                waits.append(wait)
            elif reading.state == CLOSED or breakers.claim_probe(target):
                return target, reading
            else:
                waits.append(1.0)  # another request is the half-open probe: ask again shortly
        raise BreakerOpen(
            f"The circuit breaker of every target of upstream {upstream!r} is open",
            headers={"Retry-After": retry_after(min(waits))},
        )

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            target, reading = pick(req.tried_targets)
            req.target = target
            req.tried_targets.add(target)
            try:
                response = next_handler(req)
            except UpstreamUnreachable as exc:
                breakers.record(target, exc, reading)
                raise
            if response.status in failure_statuses:
                breakers.record(target, TargetFailure(f"status {response.status}"), reading)
            else:
                breakers.record(target, None, reading)
            return response

        return handle

    return middleware


def build(ctx: Context) -> Middleware:
    """Round robin over the upstream's targets, through their breakers."""
    upstream = ctx.upstream
    return balance(upstream.name, upstream.config.targets, upstream.breakers)
