"""The two types that carry the proxy design (after KrakenD's lura): Handler and Middleware."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from werkzeug.datastructures import Headers

from app.errors import ProblemError
from app.observability import tracing
from app.observability.tracing import TraceContext

if TYPE_CHECKING:
    from app.gateway.routefile import Route
    from app.identity import Principal


@dataclass(slots=True)
class GatewayRequest:
    """A client request on its way to an upstream.

    ``body`` is None (no body), ``bytes`` (buffered, can be resent) or a ``RequestBody``
    stream; ``upstream_path`` is the path to ask the target for, without the query.
    ``target`` is the base URL chosen by the balancer for the current attempt.
    """

    method: str
    path: str
    query: str
    headers: Headers
    body: object = None
    client_addr: str = ""  # the peer's address as seen on the socket, for X-Forwarded-For
    client_ip: str = ""  # the client's address as the trusted proxies report it (limits, job scopes)
    scheme: str = "http"  # the client's scheme and host, for X-Forwarded-Proto/-Host
    host: str = ""
    route: Route | None = None
    params: dict[str, str] = field(default_factory=dict)
    upstream_path: str = ""
    raw_path: str = ""  # the client's path, still percent-encoded (what a job replays)
    request_id: str = ""
    principal: Principal | None = None  # the authenticated consumer; None when anonymous
    target: str | None = None
    upstream_seconds: float = 0.0  # time spent waiting for upstream response headers, all attempts
    tried_targets: set[str] = field(default_factory=set)  # targets attempted so far
    # The gateway's hop of the request's W3C trace: the serving request's, or the running task's.
    trace: TraceContext | None = field(default_factory=tracing.current)

    @property
    def idempotent(self) -> bool:
        """True for methods RFC 9110 section 9.2.2 calls idempotent, or with an ``Idempotency-Key``."""
        return self.method in IDEMPOTENT_METHODS or "Idempotency-Key" in self.headers


IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(slots=True)
class GatewayResponse:
    """An upstream's answer: status, headers and a body iterated lazily (streamed).

    ``close`` must be called once the body is consumed or abandoned; it runs the callbacks
    in ``on_close`` (returning the connection to its pool, releasing a bulkhead slot).
    """

    status: int
    headers: Headers
    body: Iterable[bytes] = ()
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        """Run every ``on_close`` callback, last added first, even if one raises (then re-raised)."""
        callbacks, self.on_close = self.on_close, []
        failed: BaseException | None = None
        for callback in reversed(callbacks):
            try:
                callback()
            except Exception as exc:  # noqa: BLE001 - the rest must still run; re-raised below
                failed = failed or exc
        if failed is not None:
            raise failed


def new_headers(fields: Iterable[tuple[str, str]]) -> Headers:
    """A werkzeug Headers of ``fields`` (name, value pairs), each added as ``Headers.add`` adds
    it. ``Headers(fields)`` is the same, and costs about twice as much: it asks of the argument,
    and of each value, which of the shapes it takes this is (abc isinstance checks), on every
    request, several times."""
    headers = Headers()
    add = headers.add
    for name, value in fields:
        add(name, value)
    return headers


Handler = Callable[[GatewayRequest], GatewayResponse]
Middleware = Callable[[Handler], Handler]


def unchanged(handler: Handler) -> Handler:
    """The Middleware of a stage a route does not use: it is not in the pipeline at all."""
    return handler


class UpstreamUnreachable(ProblemError):
    """The upstream could not be reached or dropped the connection (502).

    ``sent`` is False when the failure happened before any byte of the request left the
    gateway (refused or timed-out connect), so even a non-idempotent request is safe to retry.
    """

    status, title, slug = 502, "Bad Gateway", "upstream-unreachable"

    def __init__(self, detail: str, sent: bool = True, **kwargs: object):
        super().__init__(detail, **kwargs)
        self.sent = sent


class UpstreamTimeout(UpstreamUnreachable):
    """The upstream did not answer within the read timeout, or the connect timed out (504)."""

    status, title, slug = 504, "Gateway Timeout", "upstream-timeout"


class ServiceUnavailable(ProblemError):
    """The gateway refuses to call the upstream now (503 with ``Retry-After``)."""

    status, title, slug = 503, "Service Unavailable", "upstream-unavailable"


class BreakerOpen(ServiceUnavailable):
    """503: the breaker of every target of the upstream is open after repeated failures (or its one half-open probe is already out); Retry-After says in how many seconds a probe may go."""

    slug = "breaker-open"


class BulkheadFull(ServiceUnavailable):
    """503: the upstream's bulkhead (the most requests it is sent at once) is full; retry after Retry-After seconds."""

    slug = "bulkhead-full"


class PayloadTooLarge(ProblemError):
    """413: the request body is larger than the route's max_body_size (GATEWAY_MAX_BODY_SIZE by default, GATEWAY_API_MAX_BODY_SIZE on the gateway's own API); the detail gives the limit in bytes."""

    status, title, slug = 413, "Content Too Large", "payload-too-large"
