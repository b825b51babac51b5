"""One webhook attempt over HTTP: POST the signed body to the checked address, keep what came back.

Redirects are not followed (a 3xx is a failed attempt, so a receiver cannot bounce a delivery
to an internal address), proxies from the environment are ignored, the connection goes to the
address the guard checked while TLS still verifies the certificate for the URL's host, and
the whole attempt has one deadline.
"""
from __future__ import annotations

import contextlib
import email.utils
import http.client
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from app.webhooks.guard import Target

EXCERPT_BYTES = 4096


@dataclass(frozen=True)
class Result:
    """What one attempt saw: the status code (None without a response), the time it took
    (milliseconds), the first bytes of the body as text, the error when no response came, and
    ``retry_after`` (seconds) from a 429 or 503."""

    status_code: int | None
    duration_ms: int
    excerpt: str | None = None
    error: str | None = None
    retry_after: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _Watched:
    """The sockets one attempt opens, so that a timer can cut them at the deadline."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.expired = False

    def _watch(self, connection):
        # The socket is kept as it is connected: http.client drops the connection's reference
        # once a response that ends with the connection has begun, while its body is still read.
        connect = connection.connect

        def connect_and_watch() -> None:
            connect()
            self.sockets.append(connection.sock)
            if self.expired:  # the deadline passed while connecting
                self.cut()

        connection.connect = connect_and_watch
        return connection

    def pools(self) -> dict:
        watch = self._watch

        class Pool(HTTPConnectionPool):
            def _new_conn(self):
                return watch(super()._new_conn())

        class TLSPool(HTTPSConnectionPool):
            def _new_conn(self):
                return watch(super()._new_conn())

        return {"http": Pool, "https": TLSPool}

    def cut(self) -> None:
        """Shut the sockets down: a read blocked in another thread returns at once."""
        self.expired = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _PinnedAdapter(HTTPAdapter):
    """Connects to the IP address in the request URL while TLS sends and verifies ``host``
    (SNI and certificate name), as if the URL had named the host; its connections are watched."""

    def __init__(self, host: str, watched: _Watched):
        self.host = host
        super().__init__(pool_connections=1, pool_maxsize=1, max_retries=0)
        self.poolmanager.pool_classes_by_scheme = watched.pools()

    def build_connection_pool_key_attributes(self, request, verify, cert=None):
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        if host_params["scheme"] == "https":
            pool_kwargs["server_hostname"] = self.host
            pool_kwargs["assert_hostname"] = self.host
        return host_params, pool_kwargs


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delay-seconds or an HTTP-date
    (RFC 9110 section 10.2.3); None when absent or unreadable, 0 for a date in the past."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (now if now is not None else datetime.now(UTC).timestamp()))


def send(target: Target, headers: dict[str, str], body: bytes, timeout: float, verify: bool | str = True) -> Result:
    """POST ``body`` with ``headers`` to ``target`` (connecting to ``target.address``); never raises.

    ``timeout`` (seconds) bounds the whole attempt: connecting, sending, the response's head
    and the excerpt of its body; a receiver that trickles bytes is cut off at the deadline.
    Returns the Result; a network failure, a timeout or a TLS error is a Result with ``error``
    and no status code.
    """
    parts = urlsplit(target.url)
    literal = f"[{target.address}]" if ":" in target.address else target.address
    pinned = urlunsplit((parts.scheme, f"{literal}:{target.port}", parts.path or "/", parts.query, ""))
    watched = _Watched()
    adapter = _PinnedAdapter(target.host, watched)
    # Sent through the adapter, not a Session: a Session reads a 3xx body whole looking for a
    # redirect even when told not to follow it, and brings the environment's proxies and .netrc.
    prepared = requests.Request("POST", pinned, data=body, headers={**headers, "Host": host_field(target)}).prepare()
    deadline = threading.Timer(timeout, watched.cut)
    deadline.daemon = True
    started = time.monotonic()
    deadline.start()
    try:
        response = adapter.send(prepared, stream=True, timeout=(min(timeout, 10.0), timeout), verify=verify, proxies={})
        try:
            raw = response.raw.read(EXCERPT_BYTES, decode_content=True) or b""
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if response.status_code in (429, 503) else None
        finally:
            response.close()
    except requests.RequestException as exc:
        return Result(None, _ms(started), error=_late(watched, timeout) or _describe(exc))
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError) as exc:  # a broken response
        return Result(None, _ms(started), error=_late(watched, timeout) or f"{type(exc).__name__}: {exc}"[:500])
    finally:
        deadline.cancel()
        adapter.close()
    if watched.expired:  # cut off while reading the excerpt: the answer is not complete
        return Result(None, _ms(started), error=_late(watched, timeout))
    # Text of at most 4 KiB as UTF-8: bytes that are not UTF-8 become U+FFFD (three bytes each),
    # so the text is cut again, and a character cut at the end is dropped rather than replaced.
    excerpt = raw[:EXCERPT_BYTES].decode("utf-8", "replace").encode()[:EXCERPT_BYTES].decode("utf-8", "ignore")
    return Result(response.status_code, _ms(started), excerpt, None, retry_after)


def host_field(target: Target) -> str:
    """The ``Host`` value for ``target`` (RFC 9110 section 7.2): the URL's host in its ASCII
    form, bracketed when an IPv6 literal, with the port unless it is the scheme's default."""
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.scheme == "https" else 80
    return host if target.port == default else f"{host}:{target.port}"


def _late(watched: _Watched, timeout: float) -> str | None:
    return f"timeout: no complete answer within {timeout:g} s" if watched.expired else None


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _describe(exc: requests.RequestException) -> str:
    kind = {
        requests.ConnectTimeout: "connect timeout",
        requests.ReadTimeout: "read timeout",
        requests.exceptions.SSLError: "TLS error",
        requests.ConnectionError: "connection failed",
    }
    name = next((label for cls, label in kind.items() if isinstance(exc, cls)), type(exc).__name__)
    return f"{name}: {exc}"[:500]
