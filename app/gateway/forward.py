"""Forward stage: the HTTP call to the chosen target over urllib3's connection pools.

Its route-file settings live here too: an upstream's ``timeout`` and ``tls``.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import certifi
from pydantic import Field, model_validator
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)
from urllib3.util import Timeout as PoolTimeout
from werkzeug.datastructures import Headers

from app.gateway.head import UpstreamConnection, UpstreamTLSConnection
from app.gateway.schema import Strict
from app.gateway.types import (
    GatewayRequest,
    GatewayResponse,
    Handler,
    UpstreamTimeout,
    UpstreamUnreachable,
    new_headers,
)

if TYPE_CHECKING:
    from app.gateway.pipeline import Context

log = logging.getLogger("frontdoor.forward")

CHUNK = 64 * 1024  # bytes per read of the upstream's body


class Timeout(Strict):
    """Seconds to wait for a connection, and between bytes of the upstream's answer."""

    connect: Annotated[float, Field(gt=0)] = 1.0
    read: Annotated[float, Field(gt=0)] = 25.0  # with connect, inside Heroku's 30 s router limit


class TLS(Strict):
    """How an upstream's ``https://`` targets are checked, and the gateway's own certificate.

    ``verify`` false accepts any certificate (logged when the upstream is built). ``ca_file``
    is a PEM bundle of the CAs to trust; without it, as requests does: ``REQUESTS_CA_BUNDLE``,
    then ``CURL_CA_BUNDLE``, then ``SSL_CERT_FILE``, then certifi's bundle. ``client_cert`` and
    ``client_key`` (PEM files) are sent when the upstream asks for a client certificate
    (mutual TLS); the key may sit in the certificate's file.
    """

    verify: bool = True
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @model_validator(mode="after")
    def _files(self) -> TLS:
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        for name in ("ca_file", "client_cert", "client_key"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file: {path}")
        return self

    def ca_bundle(self, environ: dict | os._Environ = os.environ) -> str:
        """The CA bundle to verify targets with (a file or a directory), in the order above."""
        return self.ca_file or environ.get("REQUESTS_CA_BUNDLE") or environ.get("CURL_CA_BUNDLE") or environ.get("SSL_CERT_FILE") or certifi.where()


class _Pool(HTTPConnectionPool):
    """urllib3's pool, its connections reading answers with app.gateway.head."""

    ConnectionCls = UpstreamConnection


class _TLSPool(HTTPSConnectionPool):
    """urllib3's HTTPS pool with three changes. Its connections read answers with
    app.gateway.head. A TLS handshake that runs out of the connect timeout is a
    ConnectTimeoutError (urllib3 reports a ReadTimeoutError, as if the request had been sent).
    With ``verify: false`` there is no InsecureRequestWarning per request: the gateway logged
    it once, when the upstream was built."""

    ConnectionCls = UpstreamTLSConnection

    def __init__(self, *args, warn_unverified: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.warn_unverified = warn_unverified

    def _validate_conn(self, conn) -> None:
        try:
            if self.warn_unverified:
                super()._validate_conn(conn)
            elif conn.is_closed:
                conn.connect()
        except TimeoutError as exc:  # the builtin (socket.timeout), raised by the handshake
            raise ConnectTimeoutError(conn, f"TLS handshake with {self.host}:{self.port} timed out") from exc


class TargetPools:
    """One urllib3 connection pool per target of an upstream, each keeping up to ``size``
    keep-alive connections (the worker's thread count, so no thread waits and none is opened
    only to be thrown away). urllib3's own retries and redirects are off: the retry stage decides,
    and a redirect is the client's to follow."""

    def __init__(self, upstream: str, targets: tuple[str, ...], size: int, tls: TLS | None = None):
        tls = tls or TLS()
        self.pools: dict[str, tuple[HTTPConnectionPool, str]] = {}
        for target in targets:
            parts = urlsplit(target)
            base = parts.path.rstrip("/")
            if parts.scheme == "https":
                if not tls.verify:
                    log.warning("upstream %s: TLS certificates of %s are not verified (tls.verify: false)", upstream, parts.netloc)
                bundle = tls.ca_bundle() if tls.verify else None
                as_dir = bundle is not None and os.path.isdir(bundle)  # a c_rehash'd directory, as requests takes
                pool = _TLSPool(
                    parts.hostname,
                    parts.port,
                    maxsize=size,
                    block=False,
                    retries=False,
                    cert_reqs="CERT_REQUIRED" if tls.verify else "CERT_NONE",
                    assert_hostname=None if tls.verify else False,
                    ca_certs=None if as_dir else bundle,
                    ca_cert_dir=bundle if as_dir else None,
                    cert_file=tls.client_cert,
                    key_file=tls.client_key,
                    warn_unverified=tls.verify,
                )
            else:
                pool = _Pool(parts.hostname, parts.port, maxsize=size, block=False, retries=False)
            self.pools[target] = (pool, base)

    def close(self) -> None:
        for pool, _ in self.pools.values():
            pool.close()


def forward(pools: TargetPools, timeout: Timeout) -> Handler:
    """Build the forward handler: send ``req`` to ``req.target`` and stream the answer back.

    The response body is not read here: it is an iterator of ``CHUNK``-byte pieces, passed
    on as it arrives, still encoded (Content-Encoding is the client's to undo).
    Raises UpstreamUnreachable (502; ``sent=False`` when the connection was never made) and
    UpstreamTimeout (504) for connect and read timeouts (``timeout``, seconds).
    """
    timeouts = PoolTimeout(connect=timeout.connect, read=timeout.read)

    def handle(req: GatewayRequest) -> GatewayResponse:
        pool, base = pools.pools[req.target]
        url = base + req.upstream_path + ("?" + req.query if req.query else "")
        headers = _request_headers(req)
        started = time.perf_counter()
        try:
            raw = pool.urlopen(
                req.method,
                url,
                body=req.body,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                timeout=timeouts,
                preload_content=False,
                decode_content=False,
                release_conn=False,
            )
        except (NewConnectionError, NameResolutionError) as exc:
            # Before ConnectTimeoutError: urllib3 makes these subclasses of it.
            raise UpstreamUnreachable("Could not connect to the upstream", sent=False) from exc
        except ConnectTimeoutError as exc:
            raise UpstreamTimeout(f"Connecting to the upstream timed out after {timeout.connect} s", sent=False) from exc
        except ReadTimeoutError as exc:
            raise UpstreamTimeout(f"The upstream did not answer within {timeout.read} s") from exc
        except SSLError as exc:
            raise UpstreamUnreachable("The TLS handshake with the upstream failed", sent=False) from exc
        except ProtocolError as exc:
            raise UpstreamUnreachable("The upstream closed the connection") from exc
        except (HTTPError, OSError) as exc:
            raise UpstreamUnreachable(f"The upstream request failed: {type(exc).__name__}") from exc
        finally:
            req.upstream_seconds += time.perf_counter() - started
        try:
            fields = _response_headers(raw.headers.items(), req)
        except UpstreamUnreachable:
            _close(raw, consumed=False)
            raise
        status = raw.status
        if req.method == "HEAD" or status in _BODYLESS:
            # Nothing will be read: the connection goes back to the pool at once.
            return GatewayResponse(status=status, headers=fields, body=(), on_close=[raw.release_conn])
        body = _Body(raw, req)
        return GatewayResponse(status=status, headers=fields, body=body, on_close=[body.close])

    return handle


# RFC 9110 section 5.1 (a field name is a token) and 5.5 (no control characters but HTAB in
# a value); what gunicorn, like any HTTP/1.1 server, refuses to send.
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
_BODYLESS = frozenset({204, 304})


def _request_headers(req: GatewayRequest) -> dict[str, str]:
    """The fields to send: repeated ones combined, as RFC 9110 section 5.3 allows, and
    ``Content-Length`` from the body (bytes or a RequestBody: never chunked upstream)."""
    headers: dict[str, str] = {}
    lower: dict[str, str] = {}  # lowercased name -> the name as first sent
    for name, value in req.headers.items():
        key = name.lower()
        first = lower.get(key)
        if first is None:
            lower[key] = name
            headers[name] = value
        else:
            headers[first] = f"{headers[first]}, {value}"
    body = req.body
    if body is not None:
        for name in [name for name in headers if name.lower() == "content-length"]:
            del headers[name]
        headers["Content-Length"] = str(len(body))
    return headers


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
    return new_headers(kept)


def _close(raw, consumed: bool) -> None:
    """Hand the connection back: to the pool once its answer was read whole, else closed (a
    half-read answer would be the next request's garbage), as requests' ``Response.close``."""
    if not consumed:
        raw.close()
    raw.release_conn()


class _Body:
    """The upstream's body as ``CHUNK``-byte pieces; ``close`` returns the connection."""

    __slots__ = ("consumed", "raw", "req")

    def __init__(self, raw, req: GatewayRequest):
        self.raw, self.req, self.consumed = raw, req, False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self.raw.stream(CHUNK, decode_content=False)
        except Exception:
            # Too late for an error status: re-raise so the server aborts the connection and
            # the client sees a truncated response instead of a complete-looking one.
            log.warning("upstream body failed", extra={"request_id": self.req.request_id, "target": self.req.target}, exc_info=True)
            raise
        self.consumed = True

    def close(self) -> None:
        _close(self.raw, self.consumed)


def build(ctx: Context) -> Handler:
    """The innermost handler: the call over the upstream's pools with ``ctx.timeout``."""
    return forward(ctx.upstream.pools, ctx.timeout)
