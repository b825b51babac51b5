"""Bulkhead stage: at most ``max_concurrency`` requests in flight to one upstream, per process."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from app.gateway.types import (
    BulkheadFull,
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
)
from app.observability import metrics

if TYPE_CHECKING:
    from app.gateway.pipeline import Context


class Slots:
    """One upstream's bulkhead in this process: ``max_concurrency`` slots and how many are taken.

    A lock and a counter rather than a BoundedSemaphore (which holds a lock of its own for
    each acquire as well), so that the admin API can read the occupancy.
    """

    __slots__ = ("_lock", "in_flight", "max_concurrency")

    def __init__(self, max_concurrency: int):
        self.max_concurrency = max_concurrency
        self.in_flight = 0  # requests holding a slot now
        self._lock = threading.Lock()

    def acquire(self) -> bool:
        """Take a slot without waiting; False when every slot is taken."""
        with self._lock:
            if self.in_flight >= self.max_concurrency:
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        """Give a slot back; raises ValueError when none is taken (a slot released twice)."""
        with self._lock:
            if self.in_flight <= 0:
                raise ValueError("bulkhead slot released more often than taken")
            self.in_flight -= 1


def new_slots(max_concurrency: int | None) -> Slots | None:
    """Return the slots one upstream's routes share, or None when it has no bulkhead."""
    return Slots(max_concurrency) if max_concurrency else None


def bulkhead(upstream: str, slots: Slots | None) -> Middleware:
    """Build the bulkhead stage: take a slot without waiting or fail fast with BulkheadFull
    (503, ``Retry-After: 1``). The slot is held until the response body is closed, since the
    upstream connection is busy until then. No slots: the stage is left out.
    """
    if slots is None:
        return lambda next_handler: next_handler

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            if not slots.acquire():
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


def build(ctx: Context) -> Middleware:
    """The upstream's bulkhead (no stage without ``max_concurrency``)."""
    return bulkhead(ctx.upstream.name, ctx.upstream.slots)
