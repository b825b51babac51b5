"""Idempotency stage: on routes that opt in, a repeated unsafe request with the same
``Idempotency-Key`` gets the first answer again instead of reaching the upstream twice
(draft-ietf-httpapi-idempotency-key-header, as Stripe does it)."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

from pydantic import Field
from werkzeug.datastructures import Headers

from app.errors import ProblemError
from app.gateway.cache import _safe, read_at_most, route_key
from app.gateway.cachestore import CacheStore, Entry
from app.gateway.schema import Strict
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    unchanged,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context

SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


class Idempotency(Strict):
    """A route's idempotent replays: the first answer to a consumer's ``Idempotency-Key`` on an
    unsafe method is kept ``ttl`` seconds (bodies up to ``max_size`` bytes) and replayed."""

    ttl: Annotated[float, Field(gt=0)] = 24 * 3600.0
    max_size: Annotated[int, Field(gt=0)] = 1024 * 1024
    in_flight: Annotated[float, Field(gt=0)] = 60.0  # seconds the first request holds the key at most


class BadIdempotencyKey(ProblemError):
    """400: the Idempotency-Key field is not 1-255 visible ASCII characters."""

    status, title, slug = 400, "Bad Request", "bad-idempotency-key"


class IdempotencyKeyReused(ProblemError):
    """422: the key was first used with a different request."""

    status, title, slug = 422, "Unprocessable Content", "idempotency-key-reused"


class IdempotentRequestInFlight(ProblemError):
    """409: the first request with this key has not been answered yet."""

    status, title, slug = 409, "Conflict", "idempotency-key-in-flight"


def valid_key(value: str) -> str:
    """The ``Idempotency-Key`` value (1-255 visible ASCII characters); raises BadIdempotencyKey."""
    value = value.strip().strip('"')
    if not 1 <= len(value) <= 255 or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise BadIdempotencyKey("Idempotency-Key must be 1 to 255 visible ASCII characters")
    return value


def digest(req: GatewayRequest) -> str:
    """SHA-256 of what makes two requests the same: method, path, query and body."""
    body = req.body if isinstance(req.body, bytes) else b""
    head = f"{req.method}\n{req.raw_path or req.path}\n{req.query}\n".encode()
    return hashlib.sha256(head + hashlib.sha256(body).digest()).hexdigest()


def idempotency(
    label: str,
    rules: Idempotency | None,
    store: CacheStore | None,
    key_prefix: str,
    clock: Callable[[], float] = time.time,
) -> Middleware:
    """Build the idempotency stage (none without ``rules``).

    For an unsafe method with ``Idempotency-Key``: the first request goes upstream and its
    answer (any status the upstream gave, body up to ``max_size``) is kept ``ttl`` seconds per
    consumer and key (requests without a credential pass untouched). A repeat with the same method,
    path, query and body gets that answer with ``Idempotent-Replayed: true``; with another
    request it is IdempotencyKeyReused (422); while the first is unanswered it is
    IdempotentRequestInFlight (409, ``Retry-After: 1``). A gateway error (the upstream never
    answered) is not kept, so the client may retry. The body must be buffered (bytes).
    """
    if rules is None or store is None:
        return lambda next_handler: next_handler

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            raw = req.headers.get("Idempotency-Key")
            if req.method in SAFE or raw is None or req.principal is None or not isinstance(req.body, bytes | None):
                # Keys belong to consumers (anonymous callers share addresses); a body that was
                # not buffered cannot be compared with a repeat's.
                return next_handler(req)
            key = valid_key(raw)
            who = req.principal.consumer_id
            slot = f"{key_prefix}:idempotency:{label}:{who}:{hashlib.sha256(key.encode()).hexdigest()}"
            asked = digest(req)
            stored = _safe(lambda: store.get(slot), None)
            if stored is not None:
                return _replay(Entry.decode(stored), asked)
            if not _safe(lambda: store.lock(slot, rules.in_flight), True):
                raise IdempotentRequestInFlight(
                    "A request with this Idempotency-Key is still being processed; retry later", headers={"Retry-After": "1"}
                )
            stored = _safe(lambda: store.get(slot), None)  # the first may have finished since the look
            if stored is not None:
                _safe(lambda: store.unlock(slot), None)
                return _replay(Entry.decode(stored), asked)
            try:
                response = next_handler(req)
                _keep(store, slot, response, asked, rules, clock)
                return response
            finally:
                _safe(lambda: store.unlock(slot), None)

        return handle

    return middleware


def _replay(entry: Entry, asked: str) -> GatewayResponse:
    if entry.digest != asked:
        raise IdempotencyKeyReused("This Idempotency-Key was used with a different request; use a new key for a new request")
    headers = Headers(entry.headers)
    headers["Idempotent-Replayed"] = "true"
    return GatewayResponse(status=entry.status, headers=headers, body=[entry.body])


def _keep(store: CacheStore, slot: str, response: GatewayResponse, asked: str, rules: Idempotency, clock) -> None:
    chunks, complete = read_at_most(response, rules.max_size)
    if not complete:
        return  # delivered, not kept: a repeat would act again
    body = b"".join(chunks)
    entry = Entry(response.status, list(response.headers.items()), body, clock(), rules.ttl, asked)
    _safe(lambda: store.set(slot, entry.encode(), rules.ttl), None)


def build(ctx: Context) -> Middleware:
    """The route's idempotent replays (no stage without ``idempotency:``, nor in a job's
    worker: jobs have their own keys)."""
    if ctx.for_job or ctx.route.idempotency is None:
        return unchanged
    settings = ctx.settings
    return idempotency(route_key(ctx.route.label, ctx.route.match_headers), ctx.route.idempotency, settings.cache_store, settings.key_prefix)
