"""Header stage: drop hop-by-hop fields both ways, set X-Forwarded-* and Via (RFC 9110)."""
from __future__ import annotations

from werkzeug.datastructures import Headers

from app.gateway.types import GatewayRequest, GatewayResponse, Handler, Middleware

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
_REQUEST_DROPPED = _REQUEST_RECOMPUTED | frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id"}
)


def end_to_end(headers: Headers, also_drop: frozenset[str] = frozenset()) -> Headers:
    """Return the end-to-end fields of ``headers``: hop-by-hop ones, any field the
    ``Connection`` header names, and ``also_drop`` (lower-case names) are removed.

    A new Headers object, unless ``headers`` is a mutable Headers with nothing to remove:
    then it is returned as it is (most upstream responses).
    """
    drop = HOP_BY_HOP | also_drop
    # Connection may come as several lines (RFC 9110 section 5.3): read every one.
    for connection in headers.getlist("Connection"):
        drop = drop | {name.strip().lower() for name in connection.split(",")}
    kept = [(k, v) for k, v in headers.items() if k.lower() not in drop]
    if type(headers) is Headers and len(kept) == len(headers):
        return headers
    return Headers(kept)


def _append(current: list[str], value: str) -> str:
    """``value`` appended to a list field that may have come as several lines."""
    return ", ".join([*current, value])


def forwarding_headers(via_name: str) -> Middleware:
    """Build the header stage.

    Upstream-bound: hop-by-hop fields, ``Host`` and ``Content-Length`` removed;
    ``X-Forwarded-For`` gets the peer address appended; ``X-Forwarded-Proto`` and
    ``X-Forwarded-Host`` carry the client's scheme and host; ``Via`` gets ``1.1 <via_name>``
    appended (RFC 9110 section 7.6.3); ``X-Request-ID`` carries the request id.
    Client-bound: hop-by-hop fields removed and ``Via`` appended likewise.
    """
    via = f"1.1 {via_name}"

    def middleware(next_handler: Handler) -> Handler:
        def handle(req: GatewayRequest) -> GatewayResponse:
            original = req.headers
            headers = end_to_end(original, _REQUEST_DROPPED)
            headers.add("X-Forwarded-For", _append(original.getlist("X-Forwarded-For"), req.client_addr))
            headers.add("X-Forwarded-Proto", req.scheme)
            headers.add("X-Forwarded-Host", req.host)
            headers.add("Via", _append(original.getlist("Via"), via))
            headers.add("X-Request-ID", req.request_id)
            req.headers = headers
            response = next_handler(req)
            upstream_via = response.headers.getlist("Via")
            response.headers = end_to_end(response.headers, _RESPONSE_DROPPED)
            response.headers.add("Via", _append(upstream_via, via))
            return response

        return handle

    return middleware
