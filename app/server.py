"""The gunicorn worker the gateway runs in: gthread, with nginx-style deadlines on clients.

gunicorn's gthread worker hands a connection to a request thread as soon as it has a byte to
read; the thread then waits, without a deadline, for the rest of the request line, the header
fields and the body. A few dozen clients that send slowly hold every thread, and the process
stops answering anyone (/healthz included). ``GatewayWorker`` never lets a thread wait for a
client. A thread takes a connection that has become readable and reads what is there without
waiting, as gthread would; when that is not a whole request, the connection goes back to the
worker's non-blocking selector loop, which holds any number of connections at the cost of a
buffer each, reads the rest as it comes, the way nginx does before it passes a request on,
under two deadlines (``client_header_timeout`` and ``client_body_timeout``, see
``ClientLimits``), and hands it to a thread again once its header section, and its body when
it has a Content-Length of at most ``body_buffer_size`` bytes, are in memory. A client that misses a
deadline is answered 408 and closed by the loop; a larger or chunked body is read by the
thread, each read within the body timeout, and a miss is answered 408 from there.

Every answer the server gives itself (408, gunicorn's 400/414/431 for a request it cannot
parse, a malformed chunked body) is ``application/problem+json`` (RFC 9457), like the app's.
"""
from __future__ import annotations

import errno
import math
import os
import selectors
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from functools import partial

from gunicorn.http.body import ChunkedReader, LengthReader
from gunicorn.http.errors import (
    ConfigurationProblem,
    ExpectationFailed,
    ForbiddenProxyRequest,
    InvalidResponseHeader,
    InvalidResponseHeaderName,
    LimitRequestHeaders,
    LimitRequestLine,
    NoMoreData,
    ParseException,
    UnsupportedTransferCoding,
)
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker
from werkzeug.exceptions import BadRequest, RequestTimeout
from werkzeug.http import HTTP_STATUS_CODES

from app.errors import PROBLEM_JSON, problem_document
from app.gateway.request_id import HEADER, new_id

KiB = 1024
# The request line and header fields held in the loop at most, bytes; more answers 431
# (nginx: large_client_header_buffers 4 8k, i.e. 32 KiB).
MAX_HEAD_SIZE = 64 * KiB
RECV_SIZE = 64 * KiB  # bytes asked of the socket per read in the loop
DRAIN_SIZE = 64 * KiB  # bytes of a body the app did not read dropped to keep the connection
LINGER = 2.0  # seconds a closing connection's unread bytes are drained (RFC 9112 section 9.6)


# ClientLimits' fields and the environment variables that set them.
ENVIRONMENT = {
    "header_timeout": "GATEWAY_CLIENT_HEADER_TIMEOUT",
    "body_timeout": "GATEWAY_CLIENT_BODY_TIMEOUT",
    "body_buffer_size": "GATEWAY_CLIENT_BODY_BUFFER_SIZE",
}


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """How long a client may take to send a request, and how much of it the loop holds.

    ``header_timeout``: seconds from accepting the connection (or from the first byte of a
    later request on it) to the end of the header section (nginx: client_header_timeout).
    ``body_timeout``: seconds the body may go without a byte arriving (nginx:
    client_body_timeout, "between two successive read operations"); in a request thread the
    same bound applies to each write of the answer (nginx: send_timeout).
    ``body_buffer_size``: bytes of a Content-Length body read in the loop before a thread
    takes the request (nginx: client_body_buffer_size); a larger body is read by the thread.
    """

    header_timeout: float = 30.0
    body_timeout: float = 30.0
    body_buffer_size: int = 64 * KiB

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ClientLimits:
        """The limits from ``GATEWAY_CLIENT_HEADER_TIMEOUT`` and ``GATEWAY_CLIENT_BODY_TIMEOUT``
        (seconds, > 0) and ``GATEWAY_CLIENT_BODY_BUFFER_SIZE`` (bytes, >= 0), defaults for those
        unset. Raises ValueError naming the variable whose value is not one."""
        values: dict[str, float | int] = {}
        for field, variable in ENVIRONMENT.items():
            raw = environ.get(variable)
            if raw is None or raw == "":
                continue
            kind = int if field == "body_buffer_size" else float
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(f"{variable}={raw!r} is not a {'whole number of bytes' if kind is int else 'number of seconds'}") from None
            if value < 0 or (kind is float and value == 0):
                raise ValueError(f"{variable}={raw!r} must be {'at least 0' if kind is int else 'more than 0'}")
            values[field] = value
        return cls(**values)


class Progress(Enum):
    """How far a buffered request has arrived (``progress``)."""

    HEAD = "head"  # the header section is not complete
    BODY = "body"  # the header section is; the Content-Length body is not yet
    READY = "ready"  # a request thread can take it without waiting on the client
    TOO_LARGE = "too-large"  # the header section is longer than MAX_HEAD_SIZE bytes


def progress(buffer: bytes | bytearray, body_buffer_size: int, line_limit: int) -> Progress:
    """How far the request at the start of ``buffer`` has arrived.

    READY as soon as gunicorn's parser can take it from the buffer alone: the header section
    is complete (RFC 9112 section 2.1: it ends at the first empty line) and either there is no
    body, or its Content-Length (bytes, at most ``body_buffer_size``) is in the buffer too; or
    the body is chunked, larger, or comes after ``Expect: 100-continue`` (a thread reads it);
    or the parser will refuse what is there (a bare LF, a request line longer than
    ``line_limit`` bytes, a Content-Length that is not one number). Bytes after the request
    (a pipelined next one) are left alone.
    """
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_SIZE + 4)
    if end < 0:
        if len(buffer) > MAX_HEAD_SIZE + 4:
            return Progress.TOO_LARGE
        if buffer.count(b"\n") != buffer.count(b"\r\n"):
            return Progress.READY  # RFC 9112 section 2.2: a bare LF; gunicorn answers 400
        if line_limit and buffer.find(b"\r\n") < 0 and len(buffer) > line_limit + 2:
            return Progress.READY  # gunicorn answers 414 without waiting for the line's end
        return Progress.HEAD
    head = bytes(buffer[:end]).lower()
    if b"\ntransfer-encoding:" in head or b"\nexpect:" in head:
        return Progress.READY  # gunicorn answers 100 Continue before the body is sent
    at = head.find(b"\ncontent-length:")
    if at < 0:
        return Progress.READY
    line_end = head.find(b"\r\n", at + 1)
    value = head[at + len(b"\ncontent-length:"):line_end if line_end >= 0 else len(head)].strip(b" \t")
    if not value.isdigit() or head.find(b"\ncontent-length:", at + 1) >= 0:
        return Progress.READY  # gunicorn answers 400
    length = int(value)
    if length > body_buffer_size or len(buffer) >= end + 4 + length:
        return Progress.READY
    return Progress.BODY


def problem_message(status: int, detail: str, *, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 answer with a problem+json body (RFC 9457, ``type`` about:blank, the
    status phrase as ``title``), a new request id, and ``Connection: close``: the server's
    own answers, written before or without the app."""
    title = HTTP_STATUS_CODES.get(status, "Unknown")
    request_id = new_id()
    body = problem_document(status, title, detail, "about:blank", request_id)
    lines = [
        f"HTTP/1.1 {status} {title}",
        "Connection: close",
        f"Content-Type: {PROBLEM_JSON}",
        f"Content-Length: {len(body)}",
        f"{HEADER}: {request_id}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# gunicorn's answers to a request its parser refuses (gunicorn.workers.base.Worker.handle_error),
# first match wins: the status and how the error reads. Anything else that reaches
# handle_error is the server's or the app's fault: 500.
PARSE_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    ((InvalidResponseHeader, InvalidResponseHeaderName), 500),  # the app sent a bad header
    (ConfigurationProblem, 500),
    (LimitRequestLine, 414),
    (LimitRequestHeaders, 431),
    (ExpectationFailed, 417),
    (UnsupportedTransferCoding, 501),
    (ForbiddenProxyRequest, 403),
    (ParseException, 400),
)


def parse_error_status(exc: BaseException) -> int:
    """The status gunicorn answers ``exc`` with (400, 403, 414, 417, 431, 501), else 500."""
    for kinds, status in PARSE_ERRORS:
        if isinstance(exc, kinds):
            return status
    return 500


class MalformedBody(BadRequest):
    """The chunked request body breaks RFC 9112 section 7.1 (bad size, extension, terminator or
    trailer) or ends before its last chunk: 400, and the connection closes."""


class BodyTimeout(RequestTimeout):
    """No byte of the request body arrived within the body timeout: 408 (RFC 9110 section
    15.5.9), and the connection closes."""


class ClientInput:
    """``wsgi.input`` as the app reads it: gunicorn's request body, whose errors (raised lazily,
    as the app reads) become the app's HTTP errors, answered as problem+json by the proxy and
    the Flask app alike: a malformed chunked body is MalformedBody (400), a read that waits
    longer than the socket's timeout is BodyTimeout (408). Either closes the connection
    afterwards: where the next request would start is unknown."""

    __slots__ = ("body", "req", "timeout")

    def __init__(self, body, req, timeout: float | None):
        self.body, self.req, self.timeout = body, req, timeout

    @property
    def failed(self) -> bool:
        """Whether a read raised (gunicorn's parser then closes the connection)."""
        return self.body.failed

    def read(self, size: int | None = None) -> bytes:
        return self._call(self.body.read, size)

    def readline(self, size: int | None = None) -> bytes:
        return self._call(self.body.readline, size)

    def readlines(self, size: int | None = None) -> list[bytes]:
        return self._call(self.body.readlines, size)

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def _call(self, method, size):
        try:
            return method(size)
        except (TimeoutError, BlockingIOError):  # ClientConn's SO_RCVTIMEO: EAGAIN
            self.req.force_close()
            raise BodyTimeout(f"No byte of the request body arrived for {self.timeout:g} s (the client body timeout)") from None
        except NoMoreData:
            self.req.force_close()
            raise MalformedBody("The request body ended before its last chunk (RFC 9112 section 7.1)") from None
        except ParseException as exc:
            self.req.force_close()
            raise MalformedBody(f"The chunked request body is malformed (RFC 9112 section 7.1): {exc}") from None


def body_read(body) -> bool:
    """Whether the app read gunicorn's request ``body`` (gunicorn.http.body.Body) to its end:
    its Content-Length is used up, or its last chunk and trailers are parsed, and reading
    did not fail."""
    if body.failed:
        return False
    reader = body.reader
    if isinstance(reader, LengthReader):
        return reader.length == 0
    return isinstance(reader, ChunkedReader) and reader.parser is None


GONE = object()  # read_first: the client closed the connection


class Phase(Enum):
    """Where a connection held by the loop is."""

    IDLE = "idle"  # kept alive between requests: the keep-alive timeout
    HEAD = "head"  # a request's header section is arriving: the header timeout
    BODY = "body"  # its body is arriving: the body timeout, from the last byte
    CLOSING = "closing"  # answered and half-closed: its unread bytes are drained for LINGER


class ClientConn(TConn):
    """A client connection: gthread's, plus the bytes the loop read of its next request, where
    it is (``phase``, with a deadline in the worker's ``waiting``)."""

    def __init__(self, cfg, sock, client, server, read_timeout: float):
        super().__init__(cfg, sock, client, server)
        self.read_timeout = read_timeout
        self.buffer = bytearray()
        self.phase = Phase.HEAD
        self.held = False  # in the loop's poller, not in a thread
        self.data_ready = True  # a thread only gets it with bytes to read or a request in the buffer
        self.on_readable = None  # the poller's callback, made once
        # A thread takes a connection that has become readable with nothing of a request read
        # yet; it reads what is there without waiting (``GatewayWorker.read_first``).
        self.to_read = False
        self.head_deadline = 0.0  # when the header section is due (time.monotonic() seconds)

    def init(self) -> None:
        """In a request thread, before the request is parsed: the parser starts from the
        bytes the loop read, and each later read or write waits at most ``read_timeout``."""
        if not self.initialized:
            super().init()
            # The kernel's timeouts (SO_RCVTIMEO, SO_SNDTIMEO: a read or write that waits
            # longer fails with EAGAIN), not Python's: with socket.settimeout() every recv()
            # and send() first polls the socket, a system call more for each.
            whole = int(self.read_timeout)
            timeval = struct.pack("ll", whole, int((self.read_timeout - whole) * 1_000_000))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        if self.buffer:
            self.parser.unreader.unread(self.buffer)
            self.buffer.clear()


class GatewayWorker(ThreadWorker):
    """gunicorn's gthread worker whose threads never wait for a client: a request that has
    not all arrived is read in the selector loop (see the module docstring). It answers its
    own errors as problem+json. Connections over TLS or HTTP/2 terminated by gunicorn itself
    are served as gthread serves them."""

    def init_process(self) -> None:
        self.prepare(ClientLimits.from_environ(os.environ))
        super().init_process()  # makes the poller and the threads, then runs the loop

    def prepare(self, limits: ClientLimits) -> None:
        """Set up what the loop keeps, for ``limits``."""
        self.limits = limits
        self.in_loop = not self.cfg.is_ssl and "h2" not in self.cfg.http_protocols
        line_limit = self.cfg.limit_request_line
        self.line_limit = 8190 if line_limit < 0 or line_limit > 8190 else line_limit  # as gunicorn's Request
        # The connections held, by phase, each with its deadline, in deadline order: a
        # connection joins a phase at the end with the phase's one timeout from now, so the
        # earliest is first, and joining, leaving and expiring cost O(1), with nothing left
        # behind (gthread's deque of kept-alive connections, with O(1) removal).
        self.waiting: dict[Phase, OrderedDict[ClientConn, float]] = {phase: OrderedDict() for phase in Phase}
        self.next_deadline = math.inf  # the earliest at the front of a queue, or earlier
        self.stopping = False

    # Connections in the loop

    def accept(self, listener) -> None:
        """Accept a connection and hold it until it is readable, within the header timeout."""
        if not self.in_loop:
            return super().accept(listener)
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.take(sock, addr, listener.getsockname())

    def take(self, sock: socket.socket, addr, server) -> ClientConn:
        """Hold a new connection until its first request has arrived (the header timeout)."""
        self.nr_conns += 1
        conn = ClientConn(self.cfg, sock, addr, server, self.limits.body_timeout)
        conn.on_readable = partial(self.on_readable, conn)
        conn.head_deadline = time.monotonic() + self.limits.header_timeout
        self.hold(conn, Phase.HEAD, conn.head_deadline)
        return conn

    def hold(self, conn: ClientConn, phase: Phase, deadline: float) -> None:
        """Keep ``conn`` in the loop in ``phase`` until ``deadline``; bytes already buffered
        (a pipelined request) are looked at now, not when the socket is next readable."""
        self.wait(conn, phase, deadline)
        if not conn.held:
            conn.held = True
            self.poller.register(conn.sock, selectors.EVENT_READ, conn.on_readable)
        if conn.buffer:
            self.advance(conn)

    def wait(self, conn: ClientConn, phase: Phase, deadline: float) -> None:
        """``conn`` is in ``phase`` until ``deadline`` (``time.monotonic()`` seconds), its
        earlier deadline forgotten. ``deadline`` is never before those already in the phase's
        queue: each phase has one timeout."""
        self.waiting[conn.phase].pop(conn, None)
        conn.phase = phase
        self.waiting[phase][conn] = deadline
        self.next_deadline = min(self.next_deadline, deadline)

    def release(self, conn: ClientConn) -> None:
        """Take ``conn`` out of the loop (to a thread, or to be closed)."""
        self.waiting[conn.phase].pop(conn, None)
        if conn.held:
            conn.held = False
            self.poller.unregister(conn.sock)

    def on_readable(self, conn: ClientConn, _sock=None) -> None:
        """The selector's callback. The first bytes of a request are read by a thread, as
        gthread's are: a request that arrives whole, the common case, costs the loop no more
        than under gthread. The rest of one that did not is read here, as it comes."""
        if not conn.buffer and conn.phase in (Phase.IDLE, Phase.HEAD):
            if conn.phase is Phase.IDLE:  # a new request begins: the header timeout from now
                conn.head_deadline = time.monotonic() + self.limits.header_timeout
            conn.to_read = True
            self.release(conn)
            self.enqueue_req(conn)
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)  # the client is gone (or has sent all it will, while closing)
            return
        if conn.phase is Phase.CLOSING:
            return  # drained and dropped
        conn.buffer += data
        self.advance(conn)

    def advance(self, conn: ClientConn) -> Progress:
        """Hand ``conn`` to a thread if its request is in, else keep waiting for it (431 if
        its header section is too large); return how far it has come."""
        state = progress(conn.buffer, self.limits.body_buffer_size, self.line_limit)
        if state is Progress.READY:
            self.release(conn)
            self.enqueue_req(conn)
        elif state is Progress.BODY:  # the deadline moves with every read (client_body_timeout)
            self.wait(conn, Phase.BODY, time.monotonic() + self.limits.body_timeout)
        elif state is Progress.TOO_LARGE:
            self.refuse(conn, 431, f"The request line and header fields exceed {MAX_HEAD_SIZE} bytes")
        return state

    def refuse(self, conn: ClientConn, status: int, detail: str) -> None:
        """Answer ``status`` (problem+json) from the loop and close: the answer is small enough
        for the socket's send buffer, so a non-blocking send does not wait on the client."""
        self.log.info("Answered %s to ip=%s: %s", status, conn.client[0] if isinstance(conn.client, tuple) else "", detail)
        try:
            conn.sock.send(problem_message(status, detail))
        except OSError:
            self.close(conn)
            return
        self.linger(conn)

    def linger(self, conn: ClientConn) -> None:
        """Half-close ``conn`` and drop what it still sends for up to LINGER seconds, then close,
        so that unread bytes do not turn the close into a reset that loses the answer
        (RFC 9112 section 9.6). In the loop: gthread does this in its loop thread, blocking."""
        conn.buffer.clear()
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        self.hold(conn, Phase.CLOSING, time.monotonic() + LINGER)

    def close(self, conn: ClientConn) -> None:
        self.release(conn)
        self.nr_conns -= 1
        conn.close()

    def expire(self) -> None:
        """Close or answer the connections whose deadline has passed: an idle or silent one
        is closed; one partway through a request is answered 408 (RFC 9110 section 15.5.9)."""
        now = time.monotonic()
        self.next_deadline = math.inf
        for waiting in self.waiting.values():
            while waiting:
                conn, deadline = next(iter(waiting.items()))
                if deadline > now:
                    self.next_deadline = min(self.next_deadline, deadline)
                    break
                del waiting[conn]
                if conn.phase is Phase.HEAD and conn.buffer:
                    self.refuse(conn, 408, f"The request line and header fields did not arrive within {self.limits.header_timeout:g} s (the client header timeout)")
                elif conn.phase is Phase.BODY:
                    self.refuse(conn, 408, f"No byte of the request body arrived for {self.limits.body_timeout:g} s (the client body timeout)")
                else:
                    self.close(conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """gthread's loop step, woken in time for the next deadline, which it then enforces."""
        if not self.alive and not self.stopping:
            self.stopping = True
            self.stop_idle()
        timeout = min(timeout, max(self.next_deadline - time.monotonic(), 0.0))
        super().wait_for_and_dispatch_events(timeout)
        if time.monotonic() >= self.next_deadline:
            self.expire()

    def stop_idle(self) -> None:
        """The worker is stopping: connections with no request on the way are closed within
        STOP_KEEPALIVE_LINGER seconds (a request arriving meanwhile is still answered)."""
        deadline = time.monotonic() + STOP_KEEPALIVE_LINGER
        for phase in (Phase.IDLE, Phase.HEAD):
            waiting = self.waiting[phase]
            for conn, due in list(waiting.items()):
                # Lowering some HEAD deadlines can leave one behind a later one: it is then
                # closed when that one is, within the graceful timeout all the same.
                if not conn.buffer and due > deadline:
                    waiting[conn] = deadline
        self.next_deadline = min(self.next_deadline, deadline)

    # Back from a thread

    def finish_request(self, conn, fs) -> None:
        """A thread is done with ``conn``: close it, or hold it for its next request, looking
        at once at bytes the parser already read (a pipelined request: the socket may never
        become readable for them)."""
        if not isinstance(conn, ClientConn):
            return super().finish_request(conn, fs)
        try:
            result = fs.result() if not fs.cancelled() else False
        except Exception:  # noqa: BLE001 - as gthread's: a thread that raised leaves a connection to close
            result = False
        if isinstance(result, Progress):  # read_first: the request has not all arrived
            self.resume(conn, result)
            return
        if result is GONE:
            self.close(conn)
            return
        keepalive = bool(result)
        if not keepalive or conn.parser is None:
            self.linger(conn)
            return
        pending = conn.parser.unreader.take_buffered()
        conn.sock.setblocking(False)
        now = time.monotonic()
        if pending:
            conn.buffer += pending
            self.hold(conn, Phase.HEAD, now + self.limits.header_timeout)
        else:
            idle = self.cfg.keepalive if self.alive else min(self.cfg.keepalive, STOP_KEEPALIVE_LINGER)
            self.hold(conn, Phase.IDLE, now + idle)

    def resume(self, conn: ClientConn, state: Progress) -> None:
        """Hold ``conn``, back from ``read_first`` with part of a request, until the rest has come."""
        if state is Progress.TOO_LARGE:
            self.refuse(conn, 431, f"The request line and header fields exceed {MAX_HEAD_SIZE} bytes")
        elif state is Progress.BODY:
            self.hold(conn, Phase.BODY, time.monotonic() + self.limits.body_timeout)
        else:  # its deadline may be earlier than some in the queue: it is then kept a little late
            self.hold(conn, Phase.HEAD, conn.head_deadline)

    # In a request thread

    def handle(self, conn):
        """gthread's, after ``read_first`` for a connection the loop has read nothing of."""
        if isinstance(conn, ClientConn) and conn.to_read:
            conn.to_read = False
            state = self.read_first(conn)
            if state is not Progress.READY:
                return state
        return super().handle(conn)

    def read_first(self, conn: ClientConn) -> Progress | object:
        """Read what the client has sent, without waiting (the socket is the loop's, not
        blocking): how far its request has come, or GONE when it has closed."""
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return Progress.HEAD
        except OSError:
            return GONE
        if not data:
            return GONE
        conn.buffer += data
        return progress(conn.buffer, self.limits.body_buffer_size, self.line_limit)

    def handle_request(self, req, conn):
        """gthread's, with ``wsgi.input`` the ClientInput over the request's body."""
        req.body = ClientInput(req.body, req, self.limits.body_timeout if isinstance(conn, ClientConn) else None)
        return super().handle_request(req, conn)

    def _keepalive_after(self, conn, keepalive):
        """Whether ``conn`` can carry another request once the answer is sent. A body the app
        did not read is dropped here only as far as it has already arrived (at most
        DRAIN_SIZE bytes): gthread waits up to 5 s for the rest in this thread, which a client
        that stops sending would hold. Otherwise the connection closes, and the loop drops
        what still comes while it closes (``linger``)."""
        if not keepalive:
            return False
        if not isinstance(conn, ClientConn):
            return super()._keepalive_after(conn, keepalive)
        if body_read(conn.parser.mesg.body.body):
            return True  # the common case: no system call, which would let go of the GIL
        conn.sock.setblocking(False)
        try:
            return bool(conn.parser.finish_body(max_bytes=DRAIN_SIZE))
        except (BlockingIOError, MalformedBody, BodyTimeout):
            return False

    def handle_error(self, req, client, addr, exc) -> None:
        """Answer a request gunicorn could not parse or serve as problem+json, where gunicorn
        answers with an HTML page: 400, 414, 431 and the rest (``parse_error_status``), 500."""
        status = parse_error_status(exc)
        ip = addr[0] if isinstance(addr, tuple) else ""
        if status == 500:
            self.log.exception("Error handling request %s", getattr(req, "uri", "(no URI read)"))
            detail = "The gateway failed to handle the request"
        else:
            self.log.warning("Invalid request from ip=%s: %s", ip, exc)
            detail = str(exc)
        try:
            client.sendall(problem_message(status, detail))
        except OSError:
            self.log.debug("Failed to send error message.")
