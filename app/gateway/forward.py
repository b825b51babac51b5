"""Forward stage: the HTTP call to the chosen target over a pooled connection."""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import NameResolutionError, NewConnectionError
from werkzeug.datastructures import Headers

from app.gateway.routefile import Timeout
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    UpstreamTimeout,
    UpstreamUnreachable,
)

log = logging.getLogger("frontdoor.forward")

CHUNK = 64 * 1024  # bytes per read of the upstream's body


class ProxyAdapter(HTTPAdapter):
    """requests' pooled adapter without the client conveniences a proxy would throw away.

    ``build_response`` is the documented hook for subclasses. The stock one copies the
    headers into a case-insensitive dict and parses every ``Set-Cookie`` into a cookie jar;
    the gateway reads the raw urllib3 response and passes cookies on untouched.
    """

    def build_response(self, req: requests.PreparedRequest, resp) -> requests.Response:
        response = requests.Response()
        response.status_code = resp.status
        response.reason = resp.reason
        response.raw = resp
        response.url = req.url
        response.request = req
        response.connection = self
        return response


def new_adapter(targets: int, pool_size: int) -> HTTPAdapter:
    """Return a pooled adapter for one upstream: a pool per target host, each holding up to
    ``pool_size`` keep-alive connections (the worker's thread count, so no thread waits and
    none is opened only to be thrown away). urllib3's own retries are off; the retry stage decides.
    """
    return ProxyAdapter(pool_connections=max(targets, 1), pool_maxsize=pool_size, max_retries=0)


def forward(adapter: HTTPAdapter, timeout: Timeout) -> Handler:
    """Build the forward handler: send ``req`` to ``req.target`` and stream the answer back.

    The response body is not read here: it is an iterator of ``CHUNK``-byte pieces, passed
    on as it arrives, still encoded (Content-Encoding is the client's to undo).
    Raises UpstreamUnreachable (502; ``sent=False`` when the connection was never made) and
    UpstreamTimeout (504) for connect and read timeouts (``timeout``, seconds).
    """
    timeouts = (timeout.connect, timeout.read)

    def handle(req: GatewayRequest) -> GatewayResponse:
        prepared = _prepare(req)
        started = time.perf_counter()
        try:
            response = adapter.send(prepared, stream=True, timeout=timeouts)
        except requests.exceptions.ConnectTimeout as exc:
            raise UpstreamTimeout(f"Connecting to the upstream timed out after {timeout.connect} s", sent=False) from exc
        except requests.exceptions.ReadTimeout as exc:
            raise UpstreamTimeout(f"The upstream did not answer within {timeout.read} s") from exc
        except requests.exceptions.ConnectionError as exc:
            never_sent = _connect_failed(exc)
            what = "Could not connect to the upstream" if never_sent else "The upstream closed the connection"
            raise UpstreamUnreachable(what, sent=not never_sent) from exc
        except requests.exceptions.RequestException as exc:
            raise UpstreamUnreachable(f"The upstream request failed: {type(exc).__name__}") from exc
        finally:
            req.upstream_seconds += time.perf_counter() - started
        raw = response.raw
        try:
            headers = _response_headers(raw.headers.items(), req)
        except UpstreamUnreachable:
            response.close()
            raise
        status = response.status_code
        if req.method == "HEAD" or status in _BODYLESS:
            # Nothing will be read, and requests would close an unread connection: hand it back.
            finish = raw.release_conn
        else:
            finish = response.close  # back to the pool once read, closed if abandoned midway
        return GatewayResponse(status=status, headers=headers, body=_stream(raw, req), on_close=[finish])

    return handle


# RFC 9110 section 5.1 (a field name is a token) and 5.5 (no control characters but HTAB in
# a value); what gunicorn, like any HTTP/1.1 server, refuses to send.
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
_BODYLESS = frozenset({204, 304})


def _response_headers(fields, req: GatewayRequest) -> Headers:
    """The upstream's fields that can be sent on to the client.

    Fields with an invalid name or value are dropped (and logged by name). A Content-Length
    repeated with one value (``42, 42``) is made single, as RFC 9110 section 8.6 allows; any
    other malformed Content-Length makes the response unusable: UpstreamUnreachable (502).
    """
    kept, dropped, lengths = [], [], []
    for name, value in fields:
        if not (_FIELD_NAME.fullmatch(name) and _FIELD_VALUE.fullmatch(value)):
            dropped.append(name)
        elif name.lower() == "content-length":
            lengths.extend(part.strip() for part in value.split(","))
        else:
            kept.append((name, value))
    if lengths:
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise UpstreamUnreachable(f"The upstream sent an invalid Content-Length: {', '.join(lengths)}")
        kept.append(("Content-Length", lengths[0]))
    if dropped:
        log.warning("invalid upstream header fields dropped", extra={"request_id": req.request_id, "fields": dropped})
    return Headers(kept)


def _prepare(req: GatewayRequest) -> requests.PreparedRequest:
    """The request for the adapter, with the client's path sent as it came (still percent-encoded).

    ``PreparedRequest.prepare`` is skipped: it re-parses and re-quotes the URL and sniffs the
    body type, which the earlier stages have settled, and it cost about 15% of a pass-through
    request's time. Repeated fields are combined, as RFC 9110 section 5.3 allows, since
    requests takes one value per name.
    """
    headers = CaseInsensitiveDict()
    for name, value in req.headers.items():
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    body = req.body
    if body is not None:
        headers["Content-Length"] = str(len(body))  # bytes or RequestBody: never chunked upstream
    prepared = requests.PreparedRequest()
    prepared.method = req.method
    prepared.url = req.target + req.upstream_path + ("?" + req.query if req.query else "")
    prepared.headers = headers
    prepared.body = body
    return prepared


def _connect_failed(exc: requests.exceptions.ConnectionError) -> bool:
    """True when the failure came before the request was sent: refused, unresolvable, unreachable."""
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError | NameResolutionError)


def _stream(raw, req: GatewayRequest) -> Iterator[bytes]:
    try:
        yield from raw.stream(CHUNK, decode_content=False)
    except Exception:
        # Too late for an error status: re-raise so the server aborts the connection and
        # the client sees a truncated response instead of a complete-looking one.
        log.warning(
            "upstream body failed",
            extra={"request_id": req.request_id, "target": req.target},
            exc_info=True,
        )
        raise
