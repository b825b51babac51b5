"""Balancer stage: round robin over an upstream's targets, skipping those whose breaker is open."""
from __future__ import annotations

import itertools

from app.gateway.breaker import Reading, TargetBreakers, TargetFailure, retry_after
from app.gateway.types import (
    BreakerOpen,
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    UpstreamUnreachable,
)


def balance(upstream: str, targets: tuple[str, ...], breakers: TargetBreakers) -> Middleware:
    """Build the balancer stage for one upstream.

    Each call picks the next target in turn whose breaker is closed, half-open, or open
    long enough for a probe; sets ``req.target``; and records the outcome with that
    target's breaker: connection errors, timeouts and the breaker's ``failure_statuses``
    count as failures. Raises BreakerOpen (503, ``Retry-After`` = seconds until the first
    breaker half-opens) when every target's breaker is open.
    """
    turn = itertools.count()  # next() on a count is atomic under the GIL
    failure_statuses = frozenset(breakers.config.failure_statuses)
    size = len(targets)

    def pick() -> tuple[str, Reading]:
        start = next(turn)
        waits = []
        for offset in range(size):
            target = targets[(start + offset) % size]
            reading = breakers.read(target)
            wait = breakers.open_for(target, reading)
            if wait <= 0:
                return target, reading
            waits.append(wait)
        raise BreakerOpen(
            f"The circuit breaker of every target of upstream {upstream!r} is open",
            headers={"Retry-After": retry_after(min(waits))},
        )

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            target, reading = pick()
            req.target = target
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
