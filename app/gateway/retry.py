"""Retry stage: exponential backoff with full jitter, only where a retry cannot act twice."""
from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from app.gateway.body import replayable
from app.gateway.schema import Strict
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    ServiceUnavailable,
    UpstreamUnreachable,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context


class Retries(Strict):
    """Tries per request (1 means no retry), with exponential backoff and full jitter.

    Only idempotent methods and requests carrying ``Idempotency-Key`` are retried after the
    upstream may have seen them; a failed connect is retried for any method.
    """

    attempts: Annotated[int, Field(ge=1, le=10)] = 1
    backoff: Annotated[float, Field(ge=0)] = 0.05  # seconds, doubled per retry
    max_backoff: Annotated[float, Field(ge=0)] = 1.0  # seconds
    statuses: tuple[Annotated[int, Field(ge=500, le=599)], ...] = (502, 503, 504)


def backoff_delay(retry: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): full jitter over
    ``min(cap, base * 2 ** (retry - 1))`` (the AWS Architecture Blog's "full jitter").
    """
    return random.uniform(0, min(cap, base * 2 ** (retry - 1)))


def retry(config: Retries, sleep=time.sleep) -> Middleware:
    """Build the retry stage from an upstream's ``retries`` settings.

    A failed connect is retried for any method: the upstream never saw the request. A read
    timeout, a dropped connection or a status in ``config.statuses`` is retried only for
    idempotent requests (RFC 9110 section 9.2.2, or an ``Idempotency-Key``), since the upstream
    may have acted. A body already streamed out cannot be sent again, so it is never retried.
    Each retry goes back through the balancer, so it lands on the next healthy target.
    ``attempts: 1`` leaves the stage out.
    """
    if config.attempts <= 1:
        return lambda next_handler: next_handler
    retry_statuses = frozenset(config.statuses)

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            for attempt in range(1, config.attempts + 1):
                last = attempt == config.attempts
                try:
                    response = next_handler(req)
                except UpstreamUnreachable as exc:
                    if last or not replayable(req.body) or (exc.sent and not req.idempotent):
                        raise
                except ServiceUnavailable:
                    raise  # every breaker open, or no slot: retrying now would only add load
                else:
                    if last or response.status not in retry_statuses or not req.idempotent or not replayable(req.body):
                        return response
                    response.close()
                sleep(backoff_delay(attempt, config.backoff, config.max_backoff))
            raise AssertionError("unreachable")  # pragma: no cover

        return handle

    return middleware


def build(ctx: Context) -> Middleware:
    """The upstream's ``retries`` (no stage for one attempt)."""
    return retry(ctx.upstream.config.retries)
