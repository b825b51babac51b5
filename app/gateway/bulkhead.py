"""Bulkhead stage: at most ``max_concurrency`` requests in flight to one upstream, per process."""
from __future__ import annotations

import threading

from app.gateway.types import (
    BulkheadFull,
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
)
from app.observability import metrics


def new_slots(max_concurrency: int | None) -> threading.BoundedSemaphore | None:
    """Return the semaphore one upstream's routes share, or None when it has no bulkhead."""
    return threading.BoundedSemaphore(max_concurrency) if max_concurrency else None


def bulkhead(upstream: str, slots: threading.BoundedSemaphore | None) -> Middleware:
    """Build the bulkhead stage: take a slot without waiting or fail fast with BulkheadFull
    (503, ``Retry-After: 1``). The slot is held until the response body is closed, since the
    upstream connection is busy until then. No slots: the stage is left out.
    """
    if slots is None:
        return lambda next_handler: next_handler

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            if not slots.acquire(blocking=False):
                metrics.BULKHEAD_REJECTED.labels(upstream).inc()
                raise BulkheadFull(
                    f"Upstream {upstream!r} has reached its max_concurrency", headers={"Retry-After": "1"}
                )
            try:
                response = next_handler(req)
            except BaseException:
                slots.release()
                raise
            response.on_close.append(slots.release)
            return response

        return handle

    return middleware
