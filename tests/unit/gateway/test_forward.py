"""Forward stage: the HTTP call to the target, its streamed answer, and how failures are reported.

Every test talks to a real server on 127.0.0.1 (a thread of the test process), so what is
asserted is what urllib3 puts on the wire and reads back from it.
"""
from __future__ import annotations

import gc
import gzip
import io
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from urllib3.exceptions import ConnectTimeoutError, ProtocolError

from app.gateway.body import CHUNK, RequestBody
from app.gateway.forward import TargetPools, Timeout, _response_headers, forward
from app.gateway.types import GatewayResponse, UpstreamTimeout, UpstreamUnreachable
from tests.services import free_port, logged
from tests.unit.gateway.stand_ins import make_request

TIMEOUT = Timeout(connect=0.5, read=1.0)


# --- A real upstream on loopback -------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    target: str  # the request target, still percent-encoded
    headers: list[tuple[str, str]]
    body: bytes
    port: int  # the gateway's end of the connection: one port, one connection


Reply = Callable[[BaseHTTPRequestHandler], None]


def answer(status: int = 200, headers: list[tuple[str, str]] | None = None, body: bytes = b"ok") -> Reply:
    """A well-formed HTTP/1.1 answer with a Content-Length (no body for HEAD, 204 and 304)."""

    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in headers or []:
            handler.send_header(name, value)
        if status not in (204, 304):
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD" and status not in (204, 304):
            handler.wfile.write(body)

    return reply


def raw(data: bytes) -> Reply:
    """Bytes written as they are, then the connection closed: for answers http.server would not send."""

    def reply(handler: BaseHTTPRequestHandler) -> None:
        handler.wfile.write(data)
        handler.close_connection = True

    return reply


def hang_up(handler: BaseHTTPRequestHandler) -> None:
    """Read the request, then close the connection without a word."""
    handler.close_connection = True


class Upstream:
    """An HTTP/1.1 keep-alive server on 127.0.0.1 that records each request in ``seen`` and
    answers ``200 ok``, or what ``replies[path]`` (path without the query) says; ``slow``
    paths are held without an answer until the test ends."""

    def __init__(self) -> None:
        upstream = self
        self.seen: list[Seen] = []
        self.replies: dict[str, Reply] = {}
        self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                upstream.seen.append(Seen(self.command, self.path, list(self.headers.items()), body, self.client_address[1]))
                path = self.path.split("?", 1)[0]
                if path.startswith("/slow"):
                    upstream.stopping.wait(10)
                    self.close_connection = True
                    return
                try:
                    upstream.replies.get(path, answer())(self)
                except OSError:
                    self.close_connection = True  # the gateway gave up on this answer

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = serve

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture
def connect(upstream) -> Iterator[Callable[..., TargetPools]]:
    """``connect(*targets)``: TargetPools of two connections a target (default: the upstream),
    closed before the upstream stops."""
    made: list[TargetPools] = []

    def make(*targets: str) -> TargetPools:
        made.append(TargetPools("test", targets or (upstream.url,), 2))
        return made[-1]

    yield make
    for pools in made:
        pools.close()


@pytest.fixture
def pools(connect) -> TargetPools:
    return connect()


def send(pools: TargetPools, method: str = "GET", path: str = "/items", *, timeout: Timeout = TIMEOUT, target: str | None = None, **fields):
    req = make_request(method, path, target=target or next(iter(pools.pools)), **fields)
    return req, forward(pools, timeout)(req)


def read(response: GatewayResponse) -> bytes:
    try:
        return b"".join(response.body)
    finally:
        response.close()


# --- What is sent and what comes back ------------------------------------------------------


def test_the_answer_is_streamed_back_in_chunks(pools, upstream):
    payload = bytes(range(256)) * (2 * CHUNK // 256 + 10)
    upstream.replies["/items"] = answer(200, [("Content-Type", "application/octet-stream")], payload)

    _, response = send(pools)
    try:
        chunks = list(response.body)
    finally:
        response.close()

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert [len(chunk) for chunk in chunks] == [CHUNK, CHUNK, len(payload) - 2 * CHUNK]
    assert b"".join(chunks) == payload


def test_the_request_goes_to_the_target_with_path_query_headers_and_body(pools, upstream):
    upstream.replies["/api/orders"] = answer(201, body=b"made")

    _, response = send(
        pools,
        "POST",
        "/orders",
        upstream_path="/api/orders",
        query="page=2&q=a%20b",
        headers=[("Content-Type", "application/json"), ("X-Request-ID", "r-1")],
        body=b'{"qty": 1}',
    )

    assert (response.status, read(response)) == (201, b"made")
    [sent] = upstream.seen
    assert sent.method == "POST"
    assert sent.target == "/api/orders?page=2&q=a%20b"
    headers = dict(sent.headers)
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Request-ID"] == "r-1"
    assert headers["Content-Length"] == "10"
    assert "Transfer-Encoding" not in headers
    assert sent.body == b'{"qty": 1}'


def test_the_path_keeps_its_percent_encoding(pools, upstream):
    read(send(pools, upstream_path="/files/a%2Fb/c%20d")[1])

    assert upstream.seen[0].target == "/files/a%2Fb/c%20d"


@pytest.mark.parametrize("target_path", ["/base", "/base/"])
def test_a_target_with_a_base_path_prefixes_the_upstream_path(connect, upstream, target_path):
    pools = connect(upstream.url + target_path)

    read(send(pools, upstream_path="/items", query="x=1")[1])

    assert upstream.seen[0].target == "/base/items?x=1"


def test_repeated_request_fields_are_combined(pools, upstream):
    read(send(pools, headers=[("Accept", "text/html"), ("accept", "application/json")])[1])

    accepts = [value for name, value in upstream.seen[0].headers if name.lower() == "accept"]
    assert accepts == ["text/html, application/json"]


def test_repeated_set_cookie_fields_are_kept_separately(pools, upstream):
    upstream.replies["/items"] = answer(headers=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly")])

    _, response = send(pools)
    read(response)

    assert response.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]


def test_a_compressed_answer_is_passed_on_still_compressed(pools, upstream):
    compressed = gzip.compress(b"hello " * 100)
    upstream.replies["/items"] = answer(headers=[("Content-Encoding", "gzip")], body=compressed)

    _, response = send(pools, headers=[("Accept-Encoding", "gzip")])

    assert response.headers["Content-Encoding"] == "gzip"
    assert response.headers["Content-Length"] == str(len(compressed))
    assert read(response) == compressed


def test_the_body_sets_the_content_length_whatever_the_client_said(pools, upstream):
    read(send(pools, "POST", body=b"abc", headers=[("content-length", "99")])[1])

    [sent] = upstream.seen
    assert [value for name, value in sent.headers if name.lower() == "content-length"] == ["3"]
    assert sent.body == b"abc"


def test_a_streamed_body_is_sent_whole_with_its_length(pools, upstream):
    data = b"0123456789abcdef" * (CHUNK // 8)  # two chunks' worth
    body = RequestBody(io.BytesIO(data), len(data))

    read(send(pools, "POST", "/upload", body=body)[1])

    [sent] = upstream.seen
    headers = dict(sent.headers)
    assert headers["Content-Length"] == str(len(data))
    assert "Transfer-Encoding" not in headers
    assert sent.body == data


# --- Failures ----------------------------------------------------------------------------


@contextmanager
def full_backlog() -> Iterator[str]:
    """A listening socket on loopback whose accept queue is full: the kernel drops further
    SYNs, so a connect to it times out (no non-routable address needed). Yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            filler = socket.socket()
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break  # the queue is full: this connect was not answered either
        else:
            pytest.skip("this kernel never filled the accept queue of a listen(0) socket")
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def test_a_refused_connect_is_unreachable_and_never_sent(connect):
    pools = connect(f"http://127.0.0.1:{free_port()}")  # nothing listens there

    with pytest.raises(UpstreamUnreachable) as caught:
        send(pools)

    assert type(caught.value) is UpstreamUnreachable
    assert (caught.value.status, caught.value.sent) == (502, False)
    assert caught.value.detail == "Could not connect to the upstream"


def test_a_connect_timeout_is_a_gateway_timeout_never_sent(connect):
    with full_backlog() as url:
        pools = connect(url)
        with pytest.raises(UpstreamTimeout) as caught:
            send(pools, timeout=Timeout(connect=0.25, read=5))

    assert (caught.value.status, caught.value.sent) == (504, False)
    assert caught.value.detail == "Connecting to the upstream timed out after 0.25 s"


def test_a_connect_timeout_as_urllib3_raises_it_is_named_the_same(pools, monkeypatch):
    # The same mapping without relying on the kernel dropping SYNs (see full_backlog).
    pool, _ = pools.pools[next(iter(pools.pools))]

    def timed_out(*args, **kwargs):
        raise ConnectTimeoutError(None, "Connection to 127.0.0.1 timed out. (connect timeout=0.25)")

    monkeypatch.setattr(pool, "urlopen", timed_out)

    with pytest.raises(UpstreamTimeout, match=r"^Connecting to the upstream timed out after 0.25 s$") as caught:
        send(pools, timeout=Timeout(connect=0.25, read=7))
    assert caught.value.sent is False


def test_a_tls_handshake_that_times_out_is_a_connect_timeout_never_sent(connect):
    with socket.socket() as silent:  # the kernel completes the TCP handshake; nobody answers the TLS one
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        pools = connect(f"https://127.0.0.1:{silent.getsockname()[1]}")
        with pytest.raises(UpstreamTimeout) as caught:
            send(pools, "POST", body=b"x", timeout=Timeout(connect=0.2, read=5))

    assert (caught.value.status, caught.value.sent) == (504, False)
    assert caught.value.detail == "Connecting to the upstream timed out after 0.2 s"


def test_a_slow_answer_is_a_gateway_timeout_after_sending(pools):
    with pytest.raises(UpstreamTimeout) as caught:
        send(pools, "GET", "/slow", timeout=Timeout(connect=1, read=0.2))

    assert (caught.value.status, caught.value.sent) == (504, True)
    assert caught.value.detail == "The upstream did not answer within 0.2 s"


def test_a_connection_closed_before_the_answer_is_unreachable_after_sending(pools, upstream):
    upstream.replies["/items"] = hang_up

    with pytest.raises(UpstreamUnreachable) as caught:
        send(pools, "POST", "/items", body=b"x")

    assert type(caught.value) is UpstreamUnreachable
    assert (caught.value.status, caught.value.sent) == (502, True)
    assert caught.value.detail == "The upstream closed the connection"
    assert [seen.body for seen in upstream.seen] == [b"x"]  # it did arrive


def test_time_waiting_for_the_upstream_adds_up_over_attempts(pools):
    req = make_request("GET", "/slow", target=next(iter(pools.pools)))
    handle = forward(pools, Timeout(connect=1, read=0.1))

    for attempt in (1, 2):
        with pytest.raises(UpstreamTimeout):
            handle(req)
        assert req.upstream_seconds >= 0.1 * attempt


def test_an_answer_cut_short_fails_the_stream_and_is_logged(pools, upstream):
    upstream.replies["/truncated"] = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")

    with logged("frontdoor.forward") as records:
        req, response = send(pools, "GET", "/truncated", request_id="r-9")
        received: list[bytes] = []
        with pytest.raises(ProtocolError):
            received.extend(response.body)  # keeps the chunks that arrived before the failure
        response.close()

    assert response.status == 200
    assert b"".join(received) == b"only ten b"  # what arrived was passed on before the failure
    [record] = records.records
    assert record.getMessage() == "upstream body failed"
    assert (record.request_id, record.target) == ("r-9", req.target)


# --- Header fields of the answer ------------------------------------------------------------


def test_fields_the_server_could_not_send_on_are_dropped(pools, upstream):
    upstream.replies["/items"] = raw(b"HTTP/1.1 200 OK\r\nX-Bad: a\x7fb\r\nX-Good: 1\r\nContent-Length: 2\r\n\r\nok")

    with logged("frontdoor.forward") as records:
        _, response = send(pools, request_id="r-3")
        body = read(response)

    assert (response.headers["X-Good"], body) == ("1", b"ok")
    assert "X-Bad" not in response.headers
    [record] = records.records
    assert (record.getMessage(), record.fields) == ("invalid upstream header fields dropped", ["X-Bad"])


def test_an_interim_100_continue_is_skipped_and_the_final_answer_read(pools, upstream):
    upstream.replies["/items"] = raw(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nX-Id: 7\r\nContent-Length: 2\r\n\r\nok")

    _, response = send(pools)

    assert (response.status, response.headers["X-Id"], read(response)) == (201, "7", b"ok")


def test_a_folded_field_reaches_the_client_on_one_line(pools, upstream):
    # Obsolete line folding (RFC 9112 section 5.2): read by the standard library's parser,
    # each fold replaced with a space.
    upstream.replies["/items"] = raw(b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n two\r\nX-Next: 3\r\nContent-Length: 2\r\n\r\nok")

    _, response = send(pools)

    assert (response.headers["X-Folded"], response.headers["X-Next"], read(response)) == ("one two", "3", b"ok")


def test_a_content_length_sent_twice_with_one_value_is_sent_on_once(pools, upstream):
    upstream.replies["/items"] = raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")

    _, response = send(pools)

    assert response.headers.getlist("Content-Length") == ["5"]
    assert read(response) == b"hello"


@pytest.mark.parametrize("value", [b"5, 6", b"five"])
def test_a_malformed_content_length_on_the_wire_is_a_bad_gateway(pools, upstream, value):
    upstream.replies["/items"] = raw(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\nhello")

    with pytest.raises(UpstreamUnreachable) as caught:
        send(pools)

    assert type(caught.value) is UpstreamUnreachable
    assert caught.value.status == 502
    assert caught.value.sent is True
    # For "5, 6" urllib3 raises InvalidHeader after http.client handed the socket to its own
    # response, which nothing closes (urllib3 2.8): free it here, where its ResourceWarning is
    # expected, rather than in whichever later test the garbage collector runs.
    del caught
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.mark.parametrize(
    ("lengths", "expected"),
    [(["42"], "42"), (["42, 42"], "42"), (["42", "42"], "42")],
)
def test_a_repeated_content_length_with_one_value_is_made_single(lengths, expected):
    fields = [("Content-Length", value) for value in lengths]
    headers = _response_headers(fields, make_request())
    assert headers.getlist("Content-Length") == [expected]


@pytest.mark.parametrize("value", ["42, 43", "forty", "-1"])
def test_a_malformed_content_length_is_a_bad_gateway(value):
    with pytest.raises(UpstreamUnreachable) as caught:
        _response_headers([("Content-Length", value)], make_request())
    assert caught.value.status == 502
    assert value.split(",")[0] in caught.value.detail


# --- Pooled connections ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status"),
    [("GET", 200), ("HEAD", 200), ("GET", 204), ("GET", 304)],
)
def test_connections_are_reused_for_answers_with_and_without_a_body(pools, upstream, method, status):
    upstream.replies["/items"] = answer(status, body=b"hello")

    for _ in range(4):
        _, response = send(pools, method)
        assert response.status == status
        assert read(response) == (b"hello" if method == "GET" and status == 200 else b"")

    assert len(upstream.seen) == 4
    assert len({seen.port for seen in upstream.seen}) == 1, "every request after the first reused the connection"


def test_a_bodyless_answer_gives_its_connection_back_when_closed(pools, upstream):
    upstream.replies["/items"] = answer(204)

    _, first = send(pools)
    _, second = send(pools)  # the first still holds its connection: a second one is opened
    first.close()
    second.close()
    for _ in range(2):
        send(pools)[1].close()

    ports = [seen.port for seen in upstream.seen]
    assert ports[0] != ports[1]
    assert set(ports[2:]) <= {ports[0], ports[1]}, "both connections went back to the pool"


def test_an_abandoned_half_read_answer_closes_its_connection(pools, upstream):
    upstream.replies["/big"] = answer(body=b"x" * (4 * CHUNK))

    _, response = send(pools, "GET", "/big")
    assert len(next(iter(response.body))) == CHUNK
    response.close()  # three chunks never read: the connection cannot carry another request
    assert read(send(pools, "GET", "/after")[1]) == b"ok"

    first, after = upstream.seen
    assert first.port != after.port


def test_a_whole_answer_with_a_body_gives_its_connection_back(pools, upstream):
    upstream.replies["/big"] = answer(body=b"x" * (2 * CHUNK + 1))

    assert len(read(send(pools, "GET", "/big")[1])) == 2 * CHUNK + 1
    assert read(send(pools, "GET", "/after")[1]) == b"ok"
    first, after = upstream.seen
    assert first.port == after.port
