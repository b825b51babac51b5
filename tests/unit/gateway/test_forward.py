"""Forward stage: the HTTP call to the target, its streamed answer, and how failures are reported."""
from __future__ import annotations

import gzip
import http.server
import io
import json
import socket
import threading
import time
from typing import ClassVar

import pytest
import requests
import responses
from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

from app.gateway.body import CHUNK, RequestBody
from app.gateway.forward import _response_headers, forward, new_adapter
from app.gateway.routefile import Timeout
from app.gateway.types import UpstreamTimeout, UpstreamUnreachable
from tests.services import logged
from tests.unit.gateway.stand_ins import make_request

TARGET = "http://upstream.test"
TIMEOUT = Timeout(connect=0.5, read=1.0)


@pytest.fixture
def adapter():
    adapter = new_adapter(targets=1, pool_size=2)
    yield adapter
    adapter.close()


@pytest.fixture
def upstream():
    with responses.RequestsMock() as mock:
        yield mock


def send(adapter, method="GET", path="/items", *, timeout=TIMEOUT, target=TARGET, **fields):
    req = make_request(method, path, target=target, **fields)
    return req, forward(adapter, timeout)(req)


def test_the_answer_is_streamed_back_in_chunks(adapter, upstream):
    payload = bytes(range(256)) * (2 * CHUNK // 256 + 10)
    upstream.get(f"{TARGET}/items", body=payload, status=200, content_type="application/octet-stream")

    _, response = send(adapter)
    try:
        chunks = list(response.body)
    finally:
        response.close()

    assert response.status == 200
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert [len(chunk) for chunk in chunks] == [CHUNK, CHUNK, len(payload) - 2 * CHUNK]
    assert b"".join(chunks) == payload


def test_the_request_goes_to_the_target_with_path_query_headers_and_body(adapter, upstream):
    upstream.post(f"{TARGET}/api/orders", status=201)

    _, response = send(
        adapter,
        "POST",
        "/orders",
        upstream_path="/api/orders",
        query="page=2&q=a%20b",
        headers=[("Content-Type", "application/json"), ("X-Request-ID", "r-1")],
        body=b'{"qty": 1}',
    )
    response.close()

    assert response.status == 201
    sent = upstream.calls[0].request
    assert sent.method == "POST"
    assert sent.url == f"{TARGET}/api/orders?page=2&q=a%20b"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["X-Request-ID"] == "r-1"
    assert sent.headers["Content-Length"] == "10"
    assert sent.body == b'{"qty": 1}'


def test_the_path_keeps_its_percent_encoding(adapter, upstream):
    upstream.get(f"{TARGET}/files/a%2Fb/c%20d", status=200)

    send(adapter, upstream_path="/files/a%2Fb/c%20d")[1].close()

    assert upstream.calls[0].request.url == f"{TARGET}/files/a%2Fb/c%20d"


def test_repeated_request_fields_are_combined(adapter, upstream):
    upstream.get(f"{TARGET}/items", status=200)

    send(adapter, headers=[("Accept", "text/html"), ("Accept", "application/json")])[1].close()

    assert upstream.calls[0].request.headers["Accept"] == "text/html, application/json"


def test_repeated_set_cookie_fields_are_kept_separately(adapter, upstream):
    upstream.get(f"{TARGET}/items", headers=[("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2; HttpOnly")])

    _, response = send(adapter)
    response.close()

    assert response.headers.getlist("Set-Cookie") == ["a=1; Path=/", "b=2; HttpOnly"]


def test_a_compressed_answer_is_passed_on_still_compressed(adapter, upstream):
    compressed = gzip.compress(b"hello " * 100)
    upstream.get(f"{TARGET}/items", body=compressed, headers={"Content-Encoding": "gzip"})

    _, response = send(adapter)
    try:
        body = b"".join(response.body)
    finally:
        response.close()

    assert response.headers["Content-Encoding"] == "gzip"
    assert body == compressed


def refused() -> requests.exceptions.ConnectionError:
    # what requests raises when the TCP connect is refused (urllib3 retries are off)
    reason = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    return requests.exceptions.ConnectionError(MaxRetryError(None, f"{TARGET}/items", reason=reason))


@pytest.mark.parametrize(
    ("raised", "expected", "status", "sent"),
    [
        (refused(), UpstreamUnreachable, 502, False),
        (requests.exceptions.ConnectTimeout("connect timed out"), UpstreamTimeout, 504, False),
        (requests.exceptions.ReadTimeout("read timed out"), UpstreamTimeout, 504, True),
        (requests.exceptions.ConnectionError(ProtocolError("Connection aborted.")), UpstreamUnreachable, 502, True),
        (requests.exceptions.ChunkedEncodingError("bad chunk"), UpstreamUnreachable, 502, True),
    ],
)
def test_failures_become_gateway_errors(adapter, upstream, raised, expected, status, sent):
    upstream.get(f"{TARGET}/items", body=raised)

    with pytest.raises(expected) as caught:
        send(adapter)

    assert type(caught.value) is expected
    assert caught.value.status == status
    assert caught.value.sent is sent


def test_the_timeouts_are_named_in_the_detail(adapter, upstream):
    upstream.get(f"{TARGET}/a", body=requests.exceptions.ConnectTimeout())
    upstream.get(f"{TARGET}/b", body=requests.exceptions.ReadTimeout())
    timeout = Timeout(connect=0.25, read=7)

    with pytest.raises(UpstreamTimeout, match="after 0.25 s"):
        send(adapter, "GET", "/a", timeout=timeout)
    with pytest.raises(UpstreamTimeout, match="within 7.0 s"):
        send(adapter, "GET", "/b", timeout=timeout)


def test_time_waiting_for_the_upstream_adds_up_over_attempts(adapter, upstream):
    upstream.get(f"{TARGET}/items", body=requests.exceptions.ReadTimeout())
    req = make_request("GET", "/items", target=TARGET)
    handle = forward(adapter, Timeout())

    for _ in range(2):
        before = req.upstream_seconds
        with pytest.raises(UpstreamTimeout):
            handle(req)
        assert req.upstream_seconds > before


# A real server on 127.0.0.1, for what `responses` cannot show: the socket-level failures as
# urllib3 reports them, and a streamed request body on the wire.


class _Upstream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing left open at shutdown

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        answer = json.dumps(
            {"length": length, "chunked": "Transfer-Encoding" in self.headers, "body": body.decode()}
        ).encode()
        self._answer(200, answer)

    def do_GET(self):
        if self.path == "/slow":
            time.sleep(0.6)
            self._answer(200, b"late")
        elif self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"only ten b")
        else:
            self._answer(200, b"ok")

    def _answer(self, status, body):
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass  # the gateway gave up waiting

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def local_upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_refused_connect_is_unreachable_and_never_sent(adapter):
    with pytest.raises(UpstreamUnreachable) as caught:
        send(adapter, target=f"http://127.0.0.1:{closed_port()}")

    assert type(caught.value) is UpstreamUnreachable
    assert caught.value.status == 502
    assert caught.value.sent is False


def test_a_slow_answer_is_a_timeout_after_sending(adapter, local_upstream):
    with pytest.raises(UpstreamTimeout) as caught:
        send(adapter, "GET", "/slow", target=local_upstream, timeout=Timeout(connect=1, read=0.2))

    assert caught.value.status == 504
    assert caught.value.sent is True


def test_a_streamed_body_is_sent_whole_with_its_length(adapter, local_upstream):
    data = b"0123456789abcdef" * (CHUNK // 8)  # two chunks' worth
    body = RequestBody(io.BytesIO(data), len(data))

    _, response = send(adapter, "POST", "/echo", target=local_upstream, body=body)
    try:
        echoed = json.loads(b"".join(response.body))
    finally:
        response.close()

    assert echoed == {"length": len(data), "chunked": False, "body": data.decode()}


def test_an_answer_cut_short_fails_the_stream_and_is_logged(adapter, local_upstream):
    with logged("frontdoor.forward") as records:
        _, response = send(adapter, "GET", "/truncated", target=local_upstream, request_id="r-9")
        received = []
        with pytest.raises(ProtocolError):
            received.extend(response.body)  # keeps the chunks that arrived before the failure
        response.close()

    assert response.status == 200
    assert b"".join(received) == b"only ten b"  # what arrived was passed on before the failure
    [record] = records.records
    assert record.getMessage() == "upstream body failed"
    assert (record.request_id, record.target) == ("r-9", local_upstream)


def test_fields_the_server_could_not_send_on_are_dropped(adapter, upstream):
    upstream.get(f"{TARGET}/items", body=b"ok", headers={"X-Bad": "a\x7fb", "X-Good": "1"})

    _, response = send(adapter)
    response.close()

    assert response.headers["X-Good"] == "1"
    assert "X-Bad" not in response.headers


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


class _KeepAlive(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; records the client port of every request (one port, one connection)."""

    protocol_version = "HTTP/1.1"
    ports: ClassVar[list[int]] = []

    def _answer(self, status: int, body: bytes) -> None:
        _KeepAlive.ports.append(self.client_address[1])
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and status != 204:
            self.wfile.write(body)

    def do_GET(self):
        self._answer(204 if self.path == "/empty" else 200, b"hello")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(("method", "path"), [("GET", "/items"), ("HEAD", "/items"), ("GET", "/empty")])
def test_connections_are_reused_for_answers_with_and_without_a_body(method, path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    adapter = new_adapter(targets=1, pool_size=2)
    _KeepAlive.ports = []
    try:
        for _ in range(4):
            _, response = send(adapter, method, path, target=f"http://127.0.0.1:{server.server_port}")
            b"".join(response.body)
            response.close()
    finally:
        adapter.close()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert len(_KeepAlive.ports) == 4
    assert len(set(_KeepAlive.ports)) == 1, "every request after the first reused the connection"
