"""The gateway's gunicorn worker: its settings, how far a buffered request has come, its own
answers, the body errors the app sees, and its loop holding stand-in clients (socket pairs)."""
from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import time

import pytest
from gunicorn.config import Config
from gunicorn.http.errors import (
    ChunkMissingTerminator,
    InvalidChunkExtension,
    InvalidChunkSize,
    InvalidHeader,
    InvalidRequestLine,
    InvalidResponseHeader,
    LimitRequestHeaders,
    LimitRequestLine,
    NoMoreData,
    UnsupportedTransferCoding,
)

from app.server import (
    MAX_HEAD_SIZE,
    BodyTimeout,
    ClientConn,
    ClientInput,
    ClientLimits,
    GatewayWorker,
    MalformedBody,
    Progress,
    parse_error_status,
    problem_message,
    progress,
)

# ClientLimits


def test_the_limits_default_to_30_s_for_headers_and_between_body_reads_and_a_64_kib_body_buffer():
    assert ClientLimits.from_environ({}) == ClientLimits(header_timeout=30.0, body_timeout=30.0, body_buffer_size=65536)


def test_the_limits_are_read_from_the_environment_in_seconds_and_bytes():
    limits = ClientLimits.from_environ(
        {"GATEWAY_CLIENT_HEADER_TIMEOUT": "2.5", "GATEWAY_CLIENT_BODY_TIMEOUT": "10", "GATEWAY_CLIENT_BODY_BUFFER_SIZE": "0"}
    )
    assert limits == ClientLimits(header_timeout=2.5, body_timeout=10.0, body_buffer_size=0)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("GATEWAY_CLIENT_HEADER_TIMEOUT", "soon", "is not a number of seconds"),
        ("GATEWAY_CLIENT_BODY_TIMEOUT", "0", "must be more than 0"),
        ("GATEWAY_CLIENT_BODY_BUFFER_SIZE", "1.5", "is not a whole number of bytes"),
        ("GATEWAY_CLIENT_BODY_BUFFER_SIZE", "-1", "must be at least 0"),
    ],
)
def test_a_limit_that_is_not_one_is_refused_naming_its_variable(variable, value, says):
    with pytest.raises(ValueError, match=f"{variable}='{value}' {says}"):
        ClientLimits.from_environ({variable: value})


# progress


GET = b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n"


def post(body: bytes, length: int | None = None, extra: bytes = b"") -> bytes:
    size = len(body) if length is None else length
    return b"POST /x HTTP/1.1\r\nHost: h\r\n" + extra + b"Content-Length: " + str(size).encode() + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("buffer", "expected"),
    [
        (b"", Progress.HEAD),
        (b"GET /x HTTP/1.1\r\nHost: h\r\n", Progress.HEAD),
        (GET, Progress.READY),
        (GET + b"GET /y HT", Progress.READY),  # a pipelined request behind it waits its turn
        (post(b"abc", 10), Progress.BODY),
        (post(b"0123456789"), Progress.READY),
        (post(b"0123456789").replace(b"Content-Length", b"content-LENGTH"), Progress.READY),
        (post(b"", 0), Progress.READY),
        (post(b"abc", 100_000), Progress.READY),  # larger than the buffer: a thread reads it
        (post(b"abc", 10, extra=b"Expect: 100-continue\r\n"), Progress.READY),
        (b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", Progress.READY),
        (post(b"abc", 10, extra=b"Content-Length: 10\r\n"), Progress.READY),  # two lengths: gunicorn's 400
        (b"POST /x HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", Progress.READY),
        (b"GET /x HTTP/1.1\nHost: h", Progress.READY),  # a bare LF: gunicorn's 400 at once
        (b"GET /" + b"a" * 5000, Progress.READY),  # a request line over 4094 bytes: gunicorn's 414
        (b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_SIZE, Progress.TOO_LARGE),
        (b"GET /x HTTP/1.1\r\nX-Big: " + b"a" * MAX_HEAD_SIZE + b"\r\n\r\n", Progress.TOO_LARGE),
        (b"GET /x HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_SIZE - 22) + b"\r\n\r\n", Progress.READY),
    ],
)
def test_a_request_is_ready_for_a_thread_once_nothing_more_need_be_waited_for(buffer, expected):
    assert progress(buffer, body_buffer_size=64 * 1024, line_limit=4094) is expected


# The server's own answers


def test_the_servers_own_answer_is_problem_json_and_closes_the_connection():
    message = problem_message(408, "too slow")
    head, body = message.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == "HTTP/1.1 408 Request Timeout"
    assert fields["Connection"] == "close"
    assert fields["Content-Type"] == "application/problem+json"
    assert int(fields["Content-Length"]) == len(body)
    document = json.loads(body)
    assert document == {"type": "about:blank", "title": "Request Timeout", "status": 408, "detail": "too slow", "request_id": fields["X-Request-ID"]}


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (LimitRequestLine(9000, 4094), 414),
        (LimitRequestHeaders("max buffer headers"), 431),
        (InvalidRequestLine("GET"), 400),
        (InvalidHeader("X"), 400),
        (InvalidChunkSize(b"zz"), 400),
        (UnsupportedTransferCoding("br"), 501),
        (InvalidResponseHeader("X"), 500),  # the app's fault, not the client's
        (RuntimeError("bug"), 500),
    ],
)
def test_gunicorns_errors_keep_gunicorns_statuses(error, status):
    assert parse_error_status(error) == status


# The body as the app reads it


class StandInBody:
    """gunicorn's Body: answers reads with ``data`` or raises ``error``."""

    def __init__(self, data: bytes = b"", error: Exception | None = None):
        self.data, self.error, self.failed = data, error, False

    def read(self, size=None):
        if self.error is not None:
            self.failed = True
            raise self.error
        data, self.data = self.data, b""
        return data

    readline = read


class StandInRequest:
    closed = False

    def force_close(self):
        self.closed = True


def test_the_body_reads_through_when_nothing_is_wrong():
    req = StandInRequest()
    body = ClientInput(StandInBody(b"line\n"), req, 30.0)
    assert list(body) == [b"line\n"]
    assert not req.closed and not body.failed


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (InvalidChunkSize(b"zz"), "Invalid chunk size: b'zz'"),
        (InvalidChunkExtension("invalid chunk extension"), "Invalid chunk extension"),
        (ChunkMissingTerminator(b"xx"), "terminator"),
        (NoMoreData(b""), "ended before its last chunk"),
    ],
)
def test_a_malformed_chunked_body_is_a_400_naming_the_fault_and_closes_the_connection(error, says):
    req = StandInRequest()
    body = ClientInput(StandInBody(error=error), req, 30.0)
    with pytest.raises(MalformedBody) as raised:
        body.read(10)
    assert raised.value.code == 400
    assert says in raised.value.description
    assert req.closed and body.failed


def test_a_body_read_that_times_out_is_a_408_and_closes_the_connection():
    req = StandInRequest()
    body = ClientInput(StandInBody(error=TimeoutError("timed out")), req, 2.5)
    with pytest.raises(BodyTimeout) as raised:
        body.read()
    assert raised.value.code == 408
    assert raised.value.description == "No byte of the request body arrived for 2.5 s (the client body timeout)"
    assert req.closed


# The loop, with socket pairs as clients


class Loop:
    """A GatewayWorker's loop without gunicorn's arbiter or threads: ``enqueue_req`` records
    the connections it would hand to a thread."""

    def __init__(self, limits: ClientLimits):
        cfg = Config()
        cfg.set("keepalive", 5)
        self.worker = GatewayWorker(0, os.getpid(), [], None, 30, cfg, logging.getLogger("test.server"))
        self.worker.prepare(limits)
        self.worker.poller = selectors.DefaultSelector()
        self.worker.alive = True
        self.handed: list[ClientConn] = []
        self.worker.enqueue_req = self.thread
        self.clients: list[socket.socket] = []
        self.servers: list[socket.socket] = []

    def thread(self, conn: ClientConn) -> None:
        """What a request thread does before it parses: the first read of a connection the
        loop has read nothing of, and back to the loop if the request is not all there."""
        if conn.to_read:
            conn.to_read = False
            state = self.worker.read_first(conn)
            if state is not Progress.READY:
                self.worker.finish_request(conn, Done(state))
                return
        self.handed.append(conn)

    def connect(self) -> tuple[socket.socket, ClientConn]:
        """A client, held by the loop as ``accept`` would hold it."""
        client, server = socket.socketpair()
        self.clients.append(client)
        self.servers.append(server)
        return client, self.worker.take(server, ("127.0.0.1", 1), ("127.0.0.1", 2))

    def turn(self, seconds: float = 0.05) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.worker.wait_for_and_dispatch_events(left)

    def close(self) -> None:
        for sock in self.clients + self.servers:
            sock.close()
        self.worker.poller.close()
        self.worker.tmp.close()


@pytest.fixture
def loop():
    loop = Loop(ClientLimits(header_timeout=0.3, body_timeout=0.3, body_buffer_size=1024))
    yield loop
    loop.close()


def answer_of(client: socket.socket) -> tuple[str, dict]:
    client.settimeout(1)
    data = b""
    while chunk := client.recv(4096):
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n")[0].decode(), json.loads(body)


def test_a_request_goes_to_a_thread_only_once_its_headers_and_small_body_are_in(loop):
    client, conn = loop.connect()
    client.sendall(b"POST /x HTTP/1.1\r\nHost: h\r\n")
    loop.turn()
    client.sendall(b"Content-Length: 4\r\n\r\nab")
    loop.turn()
    assert loop.handed == []
    client.sendall(b"cd")
    loop.turn()
    assert loop.handed == [conn]
    assert bytes(conn.buffer) == post(b"abcd")


def test_many_silent_clients_are_held_without_a_thread_while_a_whole_request_goes_through(loop):
    silent = [loop.connect() for _ in range(200)]
    for client, _ in silent:
        client.sendall(b"GET /x HTTP/1.1\r\nHo")
    client, conn = loop.connect()
    client.sendall(GET)
    loop.turn()
    assert loop.handed == [conn]
    assert loop.worker.nr_conns == 201


def test_a_client_that_does_not_finish_its_headers_in_time_is_answered_408(loop):
    client, _ = loop.connect()
    client.sendall(b"GET /x HTTP/1.1\r\nHo")
    started = time.monotonic()
    loop.turn(0.5)
    status, document = answer_of(client)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert document["detail"] == "The request line and header fields did not arrive within 0.3 s (the client header timeout)"
    assert 0.25 < time.monotonic() - started < 1.0
    assert loop.handed == []


def test_a_body_that_keeps_coming_is_waited_for_and_one_that_stops_is_answered_408(loop):
    client, _ = loop.connect()
    client.sendall(post(b"a", 100))
    for _ in range(4):  # 0.8 s in all, each byte within the 0.3 s between reads
        loop.turn(0.2)
        client.sendall(b"a")
    assert loop.handed == []
    loop.turn(0.5)
    status, document = answer_of(client)
    assert status == "HTTP/1.1 408 Request Timeout"
    assert document["detail"] == "No byte of the request body arrived for 0.3 s (the client body timeout)"


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(loop):
    client, _ = loop.connect()
    loop.turn(0.5)
    client.settimeout(1)
    assert client.recv(100) == b""
    assert loop.worker.nr_conns == 0


def test_headers_larger_than_the_loop_holds_are_answered_431(loop):
    client, _ = loop.connect()
    client.sendall(b"GET /x HTTP/1.1\r\nX-Big: ")
    for _ in range(MAX_HEAD_SIZE // 4096 + 1):
        client.sendall(b"a" * 4096)
        loop.turn(0.01)
    status, document = answer_of(client)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert document["detail"] == f"The request line and header fields exceed {MAX_HEAD_SIZE} bytes"


class Done:
    """A thread's finished future."""

    def __init__(self, result: object):
        self.value = result

    def cancelled(self) -> bool:
        return False

    def result(self) -> object:
        return self.value


def test_a_pipelined_request_the_parser_already_read_is_handed_on_without_waiting_for_the_socket(loop):
    client, conn = loop.connect()
    client.sendall(GET + GET)
    loop.turn()
    assert loop.handed == [conn]
    # What a thread does: the parser takes the buffered bytes, reads one request, keeps the rest.
    conn.init()
    next(conn.parser)
    loop.handed.clear()
    loop.worker.finish_request(conn, Done(True))
    assert loop.handed == [conn]  # at once: the socket has nothing more to say
    assert bytes(conn.buffer) == GET


def test_a_kept_alive_connection_waits_idle_and_closes_quietly_after_the_keepalive_time(loop):
    loop.worker.cfg.set("keepalive", 1)  # seconds
    client, conn = loop.connect()
    client.sendall(GET)
    loop.turn()
    conn.init()
    next(conn.parser)
    loop.worker.finish_request(conn, Done(True))
    loop.turn(0.5)
    assert loop.worker.nr_conns == 1  # the header timeout (0.3 s) does not apply to an idle connection
    loop.turn(0.7)
    client.settimeout(1)
    assert client.recv(100) == b""
    assert loop.worker.nr_conns == 0
