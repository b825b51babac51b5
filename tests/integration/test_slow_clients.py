"""Clients that send slowly or badly, against the gateway under gunicorn (app.server's worker):
200 held half-sent requests do not stop it answering others; a client past its deadline gets
a 408; pipelined requests, OPTIONS *, a missing Host, a malformed chunked body and requests
gunicorn cannot parse get the answers HTTP asks for, as problem+json; connections opened
together are spread over the workers."""
from __future__ import annotations

import json
import resource
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app import create_app
from tests.factories import Identity

pytestmark = [pytest.mark.slow]

ROUTES = """
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 5.0}}
routes:
  - {{path: /httpbin, upstream: httpbin, strip_prefix: true}}
"""
HELD = 200  # the half-open connections the default deployment (2 workers x 8 threads) withstands
ANSWER_WITHIN = 1.0  # seconds


@pytest.fixture(scope="module")
def database(tmp_path_factory, httpbin_url):
    """A SQLite database with the tables and an admin's key (for the gateway's own API)."""
    root = tmp_path_factory.mktemp("slow-clients")
    url = f"sqlite:///{root / 'gateway.sqlite'}"
    routes = root / "gateway.yaml"
    routes.write_text(ROUTES.format(httpbin=httpbin_url))
    app = create_app({"CONFIG": str(routes), "SQLALCHEMY_DATABASE_URI": url, "CELERY_BROKER_URL": "memory://"})
    identity = Identity(app)
    return url, identity.key(identity.consumer("root"), scopes=("admin",))


@pytest.fixture(scope="module")
def gateway(start_gateway, httpbin_url, database):
    """The default deployment: 2 workers x 8 threads, the default client deadlines."""
    return start_gateway(ROUTES.format(httpbin=httpbin_url), workers=2, DATABASE_URL=database[0])


@pytest.fixture(scope="module")
def impatient(start_gateway, httpbin_url):
    """One worker with 1 s deadlines, so that a test can wait them out."""
    return start_gateway(
        ROUTES.format(httpbin=httpbin_url),
        workers=1,
        GATEWAY_CLIENT_HEADER_TIMEOUT="1",
        GATEWAY_CLIENT_BODY_TIMEOUT="1",
    )


def address(gateway) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").split(":")
    return host, int(port)


def connect(gateway, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(address(gateway), timeout=timeout)


def read_answer(sock: socket.socket, buffered: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer with a Content-Length from ``sock`` (``buffered``: bytes read ahead
    of it, kept for the next): status, fields (lower-case names), body."""
    while b"\r\n\r\n" not in buffered:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(buffered)!r}")
        buffered += chunk
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    length = int(fields["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the body")
        rest += chunk
    buffered[:] = rest[length:]
    return int(lines[0].split(" ")[1]), fields, rest[:length]


def exchange(gateway, data: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(gateway) as sock:
        sock.sendall(data)
        return read_answer(sock, bytearray())


def assert_problem(answer, status: int, detail_has: str) -> dict:
    got, fields, body = answer
    assert got == status, body
    assert fields["content-type"] == "application/problem+json"
    document = json.loads(body)
    assert document["status"] == status
    assert detail_has in document["detail"]
    assert document["request_id"] == fields["x-request-id"]
    return document


def closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False  # open, and nothing said
    except ConnectionError:
        return True
    finally:
        sock.setblocking(True)


def test_200_half_sent_requests_are_held_while_healthz_and_a_proxied_route_answer_within_1_s(gateway):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * HELD:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4 * HELD, hard), hard))
    half_sent = [
        b"GET /httpbin/get HTTP/1.1\r\nHost: gateway\r\nX-Slow: ",  # headers
        b"POST /httpbin/post HTTP/1.1\r\nHost: gateway\r\nContent-Length: 1000\r\n\r\n{\"a\":",  # a declared body
        b"POST /_gateway/consumers HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
        b"GET /healthz HTTP/1.1\r\nHo",
    ]
    held = []
    try:
        for n in range(HELD):
            sock = connect(gateway)
            sock.sendall(half_sent[n % len(half_sent)])
            held.append(sock)
        time.sleep(0.5)  # every one of them accepted and read by now
        took: dict[str, list[float]] = {"/healthz": [], "/httpbin/get": []}
        with requests.Session() as session:
            for _ in range(10):
                for path, times in took.items():
                    started = time.monotonic()
                    response = requests.get(gateway.url + path, timeout=ANSWER_WITHIN, headers={"Connection": "close"})
                    assert response.status_code == 200, response.text
                    times.append(time.monotonic() - started)
                # and on a kept-alive connection
                assert session.get(gateway.url + "/healthz", timeout=ANSWER_WITHIN).status_code == 200
        assert max(max(times) for times in took.values()) < ANSWER_WITHIN, took
        # Held, not dropped: every slow client is still connected and unanswered.
        assert sum(closed_by_server(sock) for sock in held) == 0
    finally:
        for sock in held:
            sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "detail"),
    [
        pytest.param(b"GET /httpbin/get HTTP/1.1\r\nHost: gateway\r\nX-Slow: ", "the client header timeout", id="headers"),
        pytest.param(b"POST /httpbin/post HTTP/1.1\r\nHost: g\r\nContent-Length: 100\r\n\r\nabc", "the client body timeout", id="body-read-in-the-loop"),
        pytest.param(b"POST /httpbin/post HTTP/1.1\r\nHost: g\r\nContent-Length: 1000000\r\n\r\nabc", "the client body timeout", id="body-read-in-a-thread"),
        pytest.param(b"POST /httpbin/post HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc", "the client body timeout", id="chunked-body"),
        pytest.param(b"POST /_gateway/consumers HTTP/1.1\r\nHost: g\r\nContent-Length: 1000000\r\n\r\n{", "Credentials are required", id="own-api-answers-first"),
    ],
)
def test_a_client_that_stops_sending_is_answered_408_after_the_deadline_and_closed(impatient, request_bytes, detail):
    with connect(impatient) as sock:
        sock.sendall(request_bytes)
        started = time.monotonic()
        status, fields, _ = answer = read_answer(sock, bytearray())
        waited = time.monotonic() - started
        if status == 401:  # the gateway's API refuses before it reads: no wait, then it closes
            assert_problem(answer, 401, detail)
            assert waited < 1.0
        else:
            assert_problem(answer, 408, detail)
            assert 0.9 < waited < 2.5
            assert fields["connection"] == "close"
        sock.settimeout(3)
        assert sock.recv(100) == b""


def test_a_silent_connection_is_closed_after_the_header_timeout_without_an_answer(impatient):
    with connect(impatient) as sock:
        started = time.monotonic()
        sock.settimeout(3)
        assert sock.recv(100) == b""
        assert 0.9 < time.monotonic() - started < 2.5


def test_pipelined_requests_are_each_answered_in_order(gateway):
    requests_ = b"".join(
        f"{method} {path} HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: pipelined-{n}\r\n{extra}\r\n{body}".encode()
        for n, (method, path, extra, body) in enumerate(
            [
                ("GET", "/httpbin/get", "", ""),
                ("POST", "/httpbin/post", "Content-Length: 5\r\n", "hello"),
                ("GET", "/healthz", "", ""),
                ("GET", "/nothing-here", "", ""),
            ]
        )
    )
    with connect(gateway) as sock:
        sock.sendall(requests_)
        buffered = bytearray()
        answers = [read_answer(sock, buffered) for _ in range(4)]
    assert [(status, fields["x-request-id"]) for status, fields, _ in answers] == [
        (200, "pipelined-0"),
        (200, "pipelined-1"),
        (200, "pipelined-2"),
        (404, "pipelined-3"),
    ]
    assert json.loads(answers[1][2])["data"] == "hello"


def test_options_asterisk_is_answered_by_the_gateway(gateway):
    status, fields, body = exchange(gateway, b"OPTIONS * HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert status == 200
    assert fields["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert body == b""


def test_an_http_1_1_request_without_host_is_a_400_problem(gateway):
    answer = exchange(gateway, b"GET /httpbin/get HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert_problem(answer, 400, "must have a Host field")


MALFORMED_CHUNKS = [
    pytest.param(b"zz\r\nabc\r\n0\r\n\r\n", "Invalid chunk size", id="size"),
    pytest.param(b"3;=x\r\nabc\r\n0\r\n\r\n", "Invalid chunk extension", id="extension"),
    pytest.param(b"3\r\nabcXY0\r\n\r\n", "terminator", id="terminator"),
]


@pytest.mark.parametrize(("chunks", "detail"), MALFORMED_CHUNKS)
def test_a_malformed_chunked_body_on_a_proxied_route_is_a_400_problem(gateway, chunks, detail):
    head = b"POST /httpbin/post HTTP/1.1\r\nHost: gateway\r\nTransfer-Encoding: chunked\r\n\r\n"
    with connect(gateway) as sock:
        sock.sendall(head + chunks)
        answer = read_answer(sock, bytearray())
        assert_problem(answer, 400, detail)
        assert answer[1]["connection"] == "close"


@pytest.mark.parametrize(("chunks", "detail"), MALFORMED_CHUNKS)
def test_a_malformed_chunked_body_on_the_gateways_own_api_is_a_400_problem(gateway, database, chunks, detail):
    head = (
        "POST /_gateway/consumers HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"X-API-Key: {database[1]}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    assert_problem(exchange(gateway, head + chunks), 400, detail)


def test_a_request_line_too_long_is_a_414_problem(gateway):
    answer = exchange(gateway, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: gateway\r\n\r\n")
    assert_problem(answer, 414, "Request Line is too large")


@pytest.mark.parametrize(
    ("request_bytes", "status", "detail"),
    [
        pytest.param(b"GET /x HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431, "exceed 65536 bytes", id="431"),
        pytest.param(b"GET /x HTTP/9.9\r\nHost: g\r\n\r\n", 400, "Invalid HTTP Version", id="version"),
        pytest.param(b"GET /x HTTP/1.1\r\nHost: g\r\nBad Name: x\r\n\r\n", 400, "Invalid HTTP header name", id="field"),
    ],
)
def test_a_request_gunicorn_cannot_parse_is_answered_as_a_problem(gateway, request_bytes, status, detail):
    assert_problem(exchange(gateway, request_bytes), status, detail)


def test_the_gateway_answers_while_slow_clients_time_out_together(impatient):
    """Deadlines are kept in the loop: 50 clients timing out at once do not delay the others."""
    held = [connect(impatient) for _ in range(50)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: g\r\nX-Slow: ")
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda sock: read_answer(sock, bytearray())[0], held))
            for _ in range(10):
                started = time.monotonic()
                assert requests.get(impatient.url + "/healthz", timeout=ANSWER_WITHIN).status_code == 200
                assert time.monotonic() - started < ANSWER_WITHIN
        assert answers == [408] * 50
    finally:
        for sock in held:
            sock.close()


def test_kept_alive_connections_opened_together_are_spread_over_the_workers(gateway):
    """32 connections opened at once, each kept for a request: both workers serve some (each
    listens on its own socket, SO_REUSEPORT), as a load balancer's pool of connections needs.
    On one shared socket one worker often took all 32."""
    marker = f"spread-{time.monotonic_ns()}"
    sockets = [connect(gateway) for _ in range(32)]
    try:
        for number, sock in enumerate(sockets):
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Request-ID: {marker}-{number}\r\n\r\n".encode())
        assert all(read_answer(sock, bytearray())[0] == 200 for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the access lines are written by each worker's log thread
        lines = [json.loads(line) for line in gateway.log.read_text().splitlines() if marker in line]
        if len(lines) == 32 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    served = Counter(line["pid"] for line in lines)
    assert len(lines) == 32 and len(served) == 2, served
    assert min(served.values()) >= 4, served
