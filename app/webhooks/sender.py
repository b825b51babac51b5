"""One webhook attempt over HTTP: POST the signed body to the checked address, keep what came back.

Redirects are not followed (a 3xx is a failed attempt, so a receiver cannot bounce a delivery
to an internal address), proxies from the environment are ignored, the connection goes to the
address the guard checked while TLS still verifies the certificate for the URL's host, and
the whole attempt has one deadline. Connections are kept alive in urllib3 pools, one per
checked address and host (``Pools``): a worker sending a batch to one receiver opens a few
connections, not one per delivery, and a pool never serves an address the guard did not check.
"""
from __future__ import annotations

import contextlib
import email.utils
import heapq
import http.client
import itertools
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import urllib3.exceptions
from requests.certs import where as default_ca_bundle
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, Timeout
from urllib3.connection import HTTPConnection, HTTPSConnection

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


# The attempt the current thread is making: its connections are cut at its deadline.
_attempt = threading.local()


class _Watched:
    """The sockets one attempt uses, so that a timer can cut them at the deadline."""

    def __init__(self):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.ended = False  # the attempt is over: its deadline no longer applies
        self.reused = False  # the connection in use was kept alive from an earlier request

    def add(self, sock: socket.socket | None) -> None:
        # The socket itself, not its connection: http.client drops the connection's reference
        # once a response that ends with the connection has begun, while its body is still read.
        if sock is not None:
            self.sockets.append(sock)
            if self.expired:  # the deadline passed while connecting
                self.cut()

    def cut(self) -> None:
        """Shut the sockets down: a read blocked in another thread returns at once."""
        self.expired = True
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Deadlines:
    """One thread per process that cuts each attempt's sockets at its deadline. (A
    ``threading.Timer`` per attempt starts a thread each: about 0.13 ms of CPU, a quarter of
    an attempt's.) Deadlines wait in a heap; an ended attempt's entry is dropped when it comes up."""

    def __init__(self):
        self._running = False  # the thread starts on first use (again in a forked process: __init__ at fork)
        self._starting = threading.Lock()

    def add(self, when: float, watched: _Watched) -> None:
        """Cut ``watched`` at ``when`` (``time.monotonic()``) unless it has ended by then."""
        if not self._running:
            with self._starting:
                if not self._running:
                    self._start()
        with self._changed:
            heapq.heappush(self._heap, (when, next(self._order), watched))
            if self._heap[0][2] is watched:
                self._changed.notify()

    def _start(self) -> None:
        self._heap: list[tuple[float, int, _Watched]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._running = True
        threading.Thread(target=self._run, name="webhook-deadlines", daemon=True).start()

    def _run(self) -> None:
        with self._changed:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].ended or self._heap[0][0] <= now):
                    _, _, watched = heapq.heappop(self._heap)
                    if not watched.ended:
                        watched.cut()
                self._changed.wait(self._heap[0][0] - now if self._heap else None)


_DEADLINES = _Deadlines()
os.register_at_fork(after_in_child=_DEADLINES.__init__)  # a forked worker process starts a thread of its own


def _watch(sock: socket.socket | None) -> None:
    watched = getattr(_attempt, "watched", None)
    if watched is not None:
        watched.add(sock)


class _Watching:
    """A connection whose socket joins the current attempt's watch when it connects."""

    def connect(self) -> None:
        super().connect()
        _watch(self.sock)


class _Connection(_Watching, HTTPConnection):
    pass


class _TLSConnection(_Watching, HTTPSConnection):
    pass


class _Reusing:
    """A pool whose idle connection, taken again, joins the current attempt's watch."""

    def _get_conn(self, timeout: float | None = None) -> HTTPConnection:
        connection = super()._get_conn(timeout)
        watched = getattr(_attempt, "watched", None)
        if watched is not None and connection.sock is not None:
            watched.reused = True
        _watch(connection.sock)  # None until it connects: then _Watching adds it
        return connection


class _Pool(_Reusing, HTTPConnectionPool):
    ConnectionCls = _Connection


class _TLSPool(_Reusing, HTTPSConnectionPool):
    ConnectionCls = _TLSConnection


class Pools:
    """Keep-alive urllib3 pools keyed by (scheme, address, port, host, verify): the address is
    the one the guard checked, and TLS sends and verifies ``host`` (SNI and certificate name).
    At most ``limit`` pools (the least recently used is closed), ``per_pool`` idle connections
    each (more are opened when needed and closed after use). Thread-safe."""

    def __init__(self, per_pool: int = 20, limit: int = 256):
        self.per_pool, self.limit = per_pool, limit
        self.pools: OrderedDict[tuple, HTTPConnectionPool] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, target: Target, verify: bool | str) -> HTTPConnectionPool:
        key = (target.scheme, target.address, target.port, target.host, verify)
        with self.lock:
            pool = self.pools.get(key)
            if pool is not None:
                self.pools.move_to_end(key)
                return pool
            pool = self._new(target, verify)
            self.pools[key] = pool
            if len(self.pools) > self.limit:
                self.pools.popitem(last=False)[1].close()
            return pool

    def _new(self, target: Target, verify: bool | str) -> HTTPConnectionPool:
        options = {"maxsize": self.per_pool, "block": False, "retries": False}
        if target.scheme != "https":
            return _Pool(target.address, target.port, **options)
        if verify is False:
            return _TLSPool(target.address, target.port, cert_reqs="CERT_NONE", assert_hostname=False, server_hostname=target.host, **options)
        ca = verify if isinstance(verify, str) else default_ca_bundle()
        return _TLSPool(
            target.address, target.port, cert_reqs="CERT_REQUIRED", ca_certs=ca, server_hostname=target.host, assert_hostname=target.host, **options
        )

    def clear(self) -> None:
        with self.lock:
            while self.pools:
                self.pools.popitem()[1].close()


# This process's pools: a Celery worker process sends every batch through them.
POOLS = Pools()
# A body left after the excerpt is read to its end, so the connection can be used again, when
# it is at most this long (bytes); a longer one, or one of unknown length, closes the connection.
DRAIN_BYTES = 64 * 1024


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


def send(target: Target, headers: dict[str, str], body: bytes, timeout: float, verify: bool | str = True, pools: Pools = POOLS) -> Result:
    """POST ``body`` with ``headers`` to ``target`` (connecting to ``target.address``, over a
    kept-alive connection from ``pools`` when one is idle); never raises.

    ``timeout`` (seconds) bounds the whole attempt: connecting, sending, the response's head
    and the excerpt of its body; a receiver that trickles bytes is cut off at the deadline.
    ``verify``: True (the certifi bundle, as requests uses), False, or a CA file's path.
    Returns the Result; a network failure, a timeout or a TLS error is a Result with ``error``
    and no status code.
    """
    parts = urlsplit(target.url)
    path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    pool = pools.get(target, verify)
    watched = _attempt.watched = _Watched()
    started = time.monotonic()
    _DEADLINES.add(started + timeout, watched)
    try:
        response = _post(pool, watched, path, body, {**headers, "Host": host_field(target)}, timeout)
        try:
            raw = response.read(EXCERPT_BYTES, decode_content=True) or b""
            retry_after = parse_retry_after(response.headers.get("Retry-After")) if response.status in (429, 503) else None
            remaining = response.length_remaining
            if not watched.expired and remaining is not None and remaining <= DRAIN_BYTES:
                response.drain_conn()  # read to its end: the connection goes back to the pool
            else:
                response.close()
        finally:
            response.release_conn()
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError, ValueError) as exc:
        return Result(None, _ms(started), error=_late(watched, timeout) or _describe(exc))
    finally:
        watched.ended = True
        _attempt.watched = None
    if watched.expired:  # cut off while reading the excerpt: the answer is not complete
        return Result(None, _ms(started), error=_late(watched, timeout))
    # Text of at most 4 KiB as UTF-8: bytes that are not UTF-8 become U+FFFD (three bytes each),
    # so the text is cut again, and a character cut at the end is dropped rather than replaced.
    excerpt = raw[:EXCERPT_BYTES].decode("utf-8", "replace").encode()[:EXCERPT_BYTES].decode("utf-8", "ignore")
    return Result(response.status, _ms(started), excerpt, None, retry_after)


# A kept-alive connection the receiver closed as the request went out (its keep-alive timeout
# ran out at that moment) fails with no answer at all; the request is made again on a new
# connection, as browsers and Go's HTTP client do: at most this many times, within the deadline.
STALE_RETRIES = 2


def _post(pool: HTTPConnectionPool, watched: _Watched, path: str, body: bytes, headers: dict[str, str], timeout: float):
    """The pool's POST, made again when it failed on a reused connection before any answer came."""
    retried = 0
    while True:
        watched.reused = False
        try:
            return pool.urlopen(
                "POST",
                path,
                body=body,
                headers=headers,
                retries=False,
                redirect=False,
                assert_same_host=False,
                timeout=Timeout(connect=min(timeout, 10.0), read=timeout),
                preload_content=False,
                release_conn=False,
            )
        except urllib3.exceptions.ProtocolError:  # reset, or closed before a status line
            retried += 1
            if not watched.reused or watched.expired or retried > STALE_RETRIES:
                raise


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


def _describe(exc: Exception) -> str:
    kind = (
        (urllib3.exceptions.NewConnectionError, "connection failed"),  # before ConnectTimeoutError, its base
        (urllib3.exceptions.ConnectTimeoutError, "connect timeout"),
        (urllib3.exceptions.ReadTimeoutError, "read timeout"),
        (urllib3.exceptions.SSLError, "TLS error"),
        (urllib3.exceptions.ProtocolError, "connection failed"),
        (OSError, "connection failed"),
    )
    name = next((label for cls, label in kind if isinstance(exc, cls)), type(exc).__name__)
    return f"{name}: {exc}"[:500]
