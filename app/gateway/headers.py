"""Header stage: drop hop-by-hop fields both ways, set X-Forwarded-* and Via (RFC 9110)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from werkzeug.datastructures import Headers

from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    Middleware,
    new_headers,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context

# RFC 9110 section 7.6.1 (Connection) and the fields it names as hop-by-hop; Proxy-Connection
# and Keep-Alive are the non-standard ones clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Recomputed for the upstream connection: the target's Host, the length of what is sent.
_REQUEST_RECOMPUTED = frozenset({"host", "content-length"})
# Via is appended below; gunicorn always writes its own Date and Server, and both are
# singleton fields, so the upstream's are not passed on (nginx hides them by default too).
_RESPONSE_DROPPED = frozenset({"via", "date", "server"})
# Set by the stage below: dropped in the same pass so that they can be appended without a scan.
_REQUEST_DROP = (
    HOP_BY_HOP
    | _REQUEST_RECOMPUTED
    | frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id"})
)
_RESPONSE_DROP = HOP_BY_HOP | _RESPONSE_DROPPED
# The credentials the gateway consumes: not passed on unless a route forwards them.
CREDENTIALS = frozenset({"authorization", "x-api-key"})
TRACE_FIELDS = frozenset({"traceparent", "tracestate"})  # replaced by the gateway's hop when it has one
# Identity the gateway asserts to upstreams; a client's own X-Consumer-* fields are never trusted.
CONSUMER_PREFIX = "x-consumer-"


def _partition(
    fields: list[tuple[str, str]], drop: frozenset[str], collect: tuple[str, ...] = (), drop_prefix: str | None = None
):
    """Split ``fields`` into those kept and, by lower-case name, the values of ``collect``.

    Dropped: the names in ``drop``, names starting with ``drop_prefix``, and every name a
    ``Connection`` line lists (it may come as several lines, RFC 9110 section 5.3). ``fields``
    is a list, so a client's headers are read out of the WSGI environ once, not per lookup.
    """
    named = [
        name.strip().lower() for key, value in fields if key.lower() == "connection" for name in value.split(",")
    ]
    if named:
        drop = drop | frozenset(named)
    collected: dict[str, list[str]] = {name: [] for name in collect}
    kept = []
    for key, value in fields:
        lower = key.lower()
        if lower in collected:
            collected[lower].append(value)
        if lower not in drop and not (drop_prefix and lower.startswith(drop_prefix)):
            kept.append((key, value))
    return kept, collected


def end_to_end(headers: Headers, also_drop: frozenset[str] = frozenset()) -> Headers:
    """Return the end-to-end fields of ``headers``: hop-by-hop ones, any field the
    ``Connection`` header names, and ``also_drop`` (lower-case names) are removed.

    A new Headers object, unless ``headers`` is a mutable Headers with nothing to remove:
    then it is returned as it is (most upstream responses).
    """
    fields = list(headers.items())
    kept, _ = _partition(fields, HOP_BY_HOP | also_drop)
    if type(headers) is Headers and len(kept) == len(fields):
        return headers
    return new_headers(kept)


def _append(current: list[str], value: str) -> str:
    """``value`` appended to a list field that may have come as several lines."""
    return ", ".join([*current, value])


def forwarding_headers(via_name: str, drop_credentials: bool = False, methods: tuple[str, ...] | None = None) -> Middleware:
    """Build the header stage.

    Upstream-bound: hop-by-hop fields, ``Host`` and ``Content-Length`` removed, and with
    ``drop_credentials`` also ``Authorization`` and ``X-API-Key``; every ``X-Consumer-*``
    field the client sent removed, and for an authenticated request ``X-Consumer-ID``,
    ``X-Consumer-Username`` and ``X-Consumer-Scopes`` (space-separated) added, as Kong does;
    ``X-Forwarded-For`` gets the peer address appended; ``X-Forwarded-Proto`` and
    ``X-Forwarded-Host`` carry the client's scheme and host; ``Via`` gets ``1.1 <via_name>``
    appended (RFC 9110 section 7.6.3); ``X-Request-ID`` carries the request id; with a trace
    context, ``traceparent`` names the gateway's hop and ``tracestate`` goes on as it came (W3C
    Trace Context). Client-bound: hop-by-hop fields removed and ``Via`` appended likewise; with
    ``methods`` (a route's), the upstream's ``Allow`` keeps only those (HEAD with GET), so that
    it never lists a method the gateway answers with 405 (RFC 9110 section 10.2.1).
    """
    via = f"1.1 {via_name}"
    response_drop = _RESPONSE_DROP | {"allow"} if methods is not None else _RESPONSE_DROP
    response_collect = ("via", "allow") if methods is not None else ("via",)  # Allow read only when it is cut
    served = set(methods or ()) | ({"HEAD"} if methods is not None and "GET" in methods else set())
    request_drop = _REQUEST_DROP | CREDENTIALS if drop_credentials else _REQUEST_DROP
    traced_drop = request_drop | TRACE_FIELDS

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            trace = req.trace
            kept, seen = _partition(
                list(req.headers.items()), request_drop if trace is None else traced_drop, ("x-forwarded-for", "via"), CONSUMER_PREFIX
            )
            kept += [
                ("X-Forwarded-For", _append(seen["x-forwarded-for"], req.client_addr)),
                ("X-Forwarded-Proto", req.scheme),
                ("X-Forwarded-Host", req.host),
                ("Via", _append(seen["via"], via)),
                ("X-Request-ID", req.request_id),
            ]
            if trace is not None:
                kept += trace.fields()
            principal = req.principal
            if principal is not None:
                kept += [
                    ("X-Consumer-ID", principal.consumer_id),
                    ("X-Consumer-Username", principal.consumer_name),
                    ("X-Consumer-Scopes", " ".join(sorted(principal.scopes))),
                ]
            req.headers = new_headers(kept)
            response = next_handler(req)
            kept, seen = _partition(list(response.headers.items()), response_drop, response_collect)
            kept.append(("Via", _append(seen["via"], via)))
            if methods is not None and seen["allow"]:
                listed = [name.strip() for value in seen["allow"] for name in value.split(",")]
                kept.append(("Allow", ", ".join(name for name in listed if name.upper() in served)))
            response.headers = new_headers(kept)
            return response

        return handle

    return middleware


def build(ctx: Context) -> Middleware:
    """Forwarding fields for one upstream call. Credentials the gateway checked are dropped
    unless the route forwards them; an aggregate's calls never pass them on."""
    route = ctx.route
    drop_credentials = ctx.call is not None or (route.auth != "none" and not route.forward_credentials)
    return forwarding_headers(ctx.settings.via_name, drop_credentials, route.methods if ctx.call is None else None)
