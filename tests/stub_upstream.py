"""A programmable HTTP/1.1 upstream on loopback: it answers as the test registered and records each request.

Close to the part of ``responses`` the gateway's tests used, so that a test reads the same,
but a real server: the gateway connects to it through its own connection pools, keep-alive
included. Use it as a context manager::

    with StubUpstream() as upstream:
        upstream.add("GET", re.compile("/items/.*"), body=b"[]", headers={"ETag": '"1"'})
        ...  # a route file whose upstream targets upstream.url
        assert upstream.calls[0].headers["X-Request-ID"] == "req-1"

A request nothing was registered for is answered ``599`` with a text body naming the request
and what was registered, so that the test's status assertion says what went wrong.
"""
from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

from werkzeug.datastructures import Headers

UNMATCHED = 599  # no registration matched; not a status a real upstream sends
HeaderFields = Mapping[str, str] | Iterable[tuple[str, str]]
Answer = tuple[int, HeaderFields | None, bytes | str]


@dataclass(frozen=True)
class Recorded:
    """One request as the stub received it.

    ``url`` is the address of the listener it came to followed by the request target as sent
    (path and query, still percent-encoded); ``path`` and ``query`` are that target's parts.
    ``headers`` are case-insensitive (werkzeug ``Headers``, repeated fields kept).
    """

    method: str
    url: str
    path: str
    query: str
    headers: Headers
    body: bytes

    @property
    def request(self) -> Recorded:
        """Itself: ``calls[i].request.headers`` reads as it did with ``responses``' ``Call``."""
        return self


@dataclass
class _Registration:
    method: str
    pattern: str | re.Pattern[str]
    answer: Callable[[Recorded], Answer]

    def matches(self, request: Recorded, base: str) -> bool:
        if request.method != self.method.upper():
            return False
        if isinstance(self.pattern, re.Pattern):
            return self.pattern.fullmatch(request.path) is not None
        if self.pattern.startswith(("http://", "https://")):
            return self.pattern == base + request.path
        return self.pattern == request.path

    def describe(self) -> str:
        pattern = self.pattern.pattern if isinstance(self.pattern, re.Pattern) else self.pattern
        return f"{self.method.upper()} {pattern}"


class StubUpstream:
    """A threaded HTTP/1.1 server on 127.0.0.1 (a free port) whose answers the test registers.

    ``add(method, pattern, ...)`` registers a fixed answer, ``add_callback`` a function of the
    request, ``replace`` swaps the answers of a pattern already registered. A pattern is a
    path (``"/items"``, the query is not compared), a compiled regular expression that must
    match the whole path, or a full URL (``f"{upstream.url}/items"``) that also names the
    listener, for an upstream with several targets (``add_target``). The first registration
    that matches answers. ``calls`` lists every request received, in order, matched or not.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registrations: list[_Registration] = []
        self._calls: list[Recorded] = []
        self._servers: list[_Server] = []

    # Lifecycle

    def __enter__(self) -> Self:
        self.add_target()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_target(self) -> str:
        """Listen on one more port, answering from the same registrations into the same
        ``calls``; return its base URL (``http://127.0.0.1:<port>``). The first is ``url``."""
        server = _Server(self)
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"stub-upstream-{server.server_port}", daemon=True).start()
        return server.base

    def stop(self) -> None:
        """Stop listening and close the connections still open (clients see them closed)."""
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_connections()
        self._servers.clear()

    @property
    def url(self) -> str:
        """The base URL of the first listener, without a trailing slash."""
        if not self._servers:
            raise RuntimeError("the stub upstream is not started: use it as a context manager")
        return self._servers[0].base

    @property
    def targets(self) -> list[str]:
        """The base URL of every listener, ``url`` first, then those of ``add_target`` in order."""
        return [server.base for server in self._servers]

    # Programming

    def add(
        self,
        method: str,
        pattern: str | re.Pattern[str],
        body: bytes | str = b"",
        status: int = 200,
        headers: HeaderFields | None = None,
        content_type: str | None = None,
    ) -> None:
        """Answer ``method`` requests matching ``pattern`` with ``status``, ``headers`` and ``body``.

        ``Content-Type`` is ``content_type``, else the one in ``headers``, else ``text/plain``
        (as ``responses`` did); ``Content-Length`` is always the body's.
        """
        fields = Headers(headers.items() if isinstance(headers, Mapping) else headers or ())
        if content_type is not None:
            fields["Content-Type"] = content_type
        elif "Content-Type" not in fields:
            fields["Content-Type"] = "text/plain"
        self._register(_Registration(method, pattern, lambda _request: (status, fields, body)))

    def add_callback(self, method: str, pattern: str | re.Pattern[str], callback: Callable[[Recorded], Answer]) -> None:
        """Answer ``method`` requests matching ``pattern`` with ``callback(request)``, which returns
        ``(status, headers, body)``; ``headers`` a mapping or pairs, ``body`` bytes or str (UTF-8)."""
        self._register(_Registration(method, pattern, callback))

    def replace(self, method: str, pattern: str | re.Pattern[str], **answer) -> None:
        """Drop what ``method`` and ``pattern`` were registered with, then ``add(method, pattern, **answer)``."""
        with self._lock:
            self._registrations = [r for r in self._registrations if (r.method.upper(), r.pattern) != (method.upper(), pattern)]
        self.add(method, pattern, **answer)

    def reset(self) -> None:
        """Forget every registration and every recorded call."""
        with self._lock:
            self._registrations.clear()
            self._calls.clear()

    @property
    def calls(self) -> list[Recorded]:
        """The requests received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._calls)

    def _register(self, registration: _Registration) -> None:
        with self._lock:
            self._registrations.append(registration)

    def _answer(self, request: Recorded, base: str) -> tuple[int, Headers, bytes]:
        with self._lock:
            self._calls.append(request)
            found = next((r for r in self._registrations if r.matches(request, base)), None)
            registered = [r.describe() for r in self._registrations]
        if found is None:
            text = f"stub upstream: nothing registered for {request.method} {request.url}; registered: {registered or 'nothing'}"
            return UNMATCHED, Headers([("Content-Type", "text/plain")]), text.encode()
        try:
            status, headers, body = found.answer(request)
        except Exception as exc:  # noqa: BLE001 - any error of the test's callback: the test reads it in the answer
            text = f"stub upstream: the callback for {found.describe()} raised {exc!r}"
            return UNMATCHED, Headers([("Content-Type", "text/plain")]), text.encode()
        fields = headers if isinstance(headers, Headers) else Headers(headers.items() if isinstance(headers, Mapping) else headers or ())
        return status, fields, body.encode() if isinstance(body, str) else body


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, stub: StubUpstream):
        self.stub = stub
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)
        self.base = f"http://127.0.0.1:{self.server_port}"

    def process_request(self, request, client_address) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the client closed it first


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the gateway's pools reuse connections
    server: _Server

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler looks for do_<METHOD>: every method is answered the same way.
        if name.startswith("do_"):
            return self._serve
        raise AttributeError(name)

    def _serve(self) -> None:
        target = urlsplit(self.path)
        recorded = Recorded(
            method=self.command,
            url=self.server.base + self.path,
            path=target.path,
            query=target.query,
            headers=Headers(list(self.headers.items())),
            body=self._read_body(),
        )
        status, headers, body = self.server.stub._answer(recorded, self.server.base)
        self.send_response_only(status)
        for name, value in headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        bodyless = status < 200 or status in (204, 304)
        if not bodyless:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not bodyless and self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";", 1)[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailer fields
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def log_message(self, format: str, *args) -> None:
        pass  # the test's own output says what matters
