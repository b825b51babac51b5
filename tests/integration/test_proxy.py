"""The gateway under real gunicorn in front of real upstreams, observed over HTTP."""
from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests import services
from tests.conftest import delete_keys

pytestmark = [pytest.mark.slow, pytest.mark.redis]

ROUTES = """
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 3.0}}
  breakable:
    targets: ["{httpbin}"]
    breaker: {{fail_max: 3, reset_timeout: 4}}
  flaky:
    targets: ["http://127.0.0.1:{closed}", "{httpbin}"]
    retries: {{attempts: 2, backoff: 0.01}}
    breaker: {{fail_max: 1000}}
  refused:
    targets: ["http://127.0.0.1:{closed}"]
  bulk:
    targets: ["{bulk}"]
    timeout: {{connect: 1.0, read: 10.0}}
  blackhole:
    targets: ["{blackhole}"]
    timeout: {{connect: 1.0, read: 2.0}}
  narrow:
    targets: ["{httpbin}"]
    max_concurrency: 1
routes:
  - {{path: /httpbin, upstream: httpbin, strip_prefix: true}}
  - {{path: /breakable, upstream: breakable, strip_prefix: true}}
  - {{path: /flaky, upstream: flaky, strip_prefix: true}}
  - {{path: /refused, upstream: refused}}
  - {{path: /bulk, upstream: bulk, strip_prefix: true}}
  - {{path: /blackhole, upstream: blackhole}}
  - {{path: /narrow, upstream: narrow, strip_prefix: true}}
  - {{path: /small, upstream: httpbin, max_body_size: 1024}}
  - {{path: /read-only, upstream: httpbin, strip_prefix: true, methods: [GET]}}
"""


def closed_port() -> int:
    return services.free_port()  # nothing listens on a port just released


@pytest.fixture(scope="module")
def routes(httpbin_url, bulk_url, blackhole_url):
    return ROUTES.format(httpbin=httpbin_url, bulk=bulk_url, blackhole=blackhole_url, closed=closed_port())


@pytest.fixture(scope="module")
def shared(redis_url):
    prefix = services.unique("it")
    yield {"REDIS_URL": redis_url, "GATEWAY_KEY_PREFIX": prefix, "GATEWAY_MAX_BODY_SIZE": str(150 * 2**20)}
    delete_keys(redis_url, prefix)


@pytest.fixture(scope="module")
def gateway(start_gateway, routes, shared):
    return start_gateway(routes, workers=2, **shared)


@pytest.fixture(scope="module")
def second_gateway(start_gateway, routes, shared):
    """Another gateway process on the same Redis, as a second dyno would be."""
    return start_gateway(routes, workers=1, **shared)


def test_proxies_with_forwarding_headers_and_request_id(gateway):
    response = requests.get(
        f"{gateway.url}/httpbin/get?show_env=1&x=1",
        headers={"X-Request-ID": "req-123", "X-Forwarded-For": "203.0.113.9", "Connection": "X-Hop", "X-Hop": "secret", "Keep-Alive": "5"},
    )
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "req-123"
    assert response.headers["Via"] == "1.1 frontdoor"
    seen = response.json()
    assert seen["args"] == {"show_env": "1", "x": "1"}
    upstream_headers = seen["headers"]
    assert upstream_headers["X-Request-Id"] == "req-123"
    assert upstream_headers["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert upstream_headers["X-Forwarded-Proto"] == "http"
    assert upstream_headers["X-Forwarded-Host"] == gateway.url.removeprefix("http://")
    assert upstream_headers["Via"] == "1.1 frontdoor"
    assert "X-Hop" not in upstream_headers and "Keep-Alive" not in upstream_headers


def test_generates_a_request_id_when_the_client_sends_none_or_a_bad_one(gateway):
    for sent in (None, "bad id with spaces"):
        headers = {"X-Request-ID": sent} if sent else {}
        response = requests.get(f"{gateway.url}/httpbin/get?show_env=1", headers=headers)
        generated = response.headers["X-Request-ID"]
        assert generated != sent and len(generated) == 32
        assert response.json()["headers"]["X-Request-Id"] == generated


def test_one_access_log_line_per_request(gateway):
    request_id = uuid.uuid4().hex
    requests.get(f"{gateway.url}/httpbin/status/418", headers={"X-Request-ID": request_id})
    # Written by the worker's log thread: polled for (it was a fixed 0.2 s).
    lines = services.wait_until(lambda: [line for line in gateway.log_lines() if line.get("request_id") == request_id], 10, "the access line")
    assert len(lines) == 1
    line = lines[0]
    assert line["method"] == "GET" and line["path"] == "/httpbin/status/418" and line["status"] == 418
    assert line["route"] == "/httpbin" and line["target"].startswith("http://127.0.0.1:")
    assert line["duration_ms"] >= line["upstream_ms"] > 0


def test_request_body_reaches_the_upstream(gateway):
    response = requests.post(f"{gateway.url}/httpbin/anything", data=b"hello" * 1000, headers={"Content-Type": "text/plain"})
    assert response.status_code == 200
    assert response.json()["data"] == "hello" * 1000


def test_chunked_request_body_reaches_the_upstream(gateway):
    response = requests.post(f"{gateway.url}/bulk/count", data=(b"x" * 70_000 for _ in range(3)))
    assert response.json() == {"received": 210_000}


def test_unknown_path_is_a_404_problem(gateway):
    response = requests.get(f"{gateway.url}/nothing/here")
    assert response.status_code == 404
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["status"] == 404 and response.json()["request_id"] == response.headers["X-Request-ID"]


def test_method_filter_answers_405_with_allow(gateway):
    response = requests.post(f"{gateway.url}/read-only/post", data=b"x")
    assert response.status_code == 405
    assert response.headers["Allow"] == "GET, HEAD"
    assert response.headers["Content-Type"] == "application/problem+json"


def test_body_over_the_route_limit_is_413(gateway):
    response = requests.post(f"{gateway.url}/small/anything", data=b"x" * 2048)
    assert response.status_code == 413
    assert response.json()["detail"] == "The request body (2048 bytes) exceeds the limit of 1024 bytes"


def test_declared_length_over_the_limit_is_413_before_the_body_is_sent(gateway):
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /bulk/count HTTP/1.1\r\nHost: x\r\nContent-Length: 209715200\r\n\r\n")
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413")


def test_unreachable_upstream_is_502(gateway):
    response = requests.get(f"{gateway.url}/refused")
    assert response.status_code == 502
    assert response.json()["type"] == "/_gateway/problems/upstream-unreachable"


def test_refused_connect_is_retried_on_the_next_target_even_for_post(gateway):
    statuses = [requests.post(f"{gateway.url}/flaky/post", data=b"x").status_code for _ in range(6)]
    assert statuses == [200] * 6


def test_silent_upstream_is_504_at_the_read_timeout_while_other_routes_answer(gateway):
    result = {}

    def call_blackhole():
        started = time.monotonic()
        result["response"] = requests.get(f"{gateway.url}/blackhole", timeout=10)
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=call_blackhole)
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    other = requests.get(f"{gateway.url}/httpbin/get", timeout=5)
    other_elapsed = time.monotonic() - started
    held = thread.is_alive()
    thread.join()
    # The other route answered while the silent upstream still held its request (read timeout
    # 2 s: room for a loaded machine, where a 0.8 s bound on the other answer once failed at 1.04 s).
    assert other.status_code == 200 and held, other_elapsed
    assert result["response"].status_code == 504
    assert result["response"].json()["type"] == "/_gateway/problems/upstream-timeout"
    assert 2.0 <= result["elapsed"] < 5.0


def test_bulkhead_fails_excess_requests_fast(gateway):
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: requests.get(f"{gateway.url}/narrow/delay/1"), range(6)))
    statuses = [r.status_code for r in responses]
    rejected = [r for r in responses if r.status_code == 503]
    # max_concurrency is per worker process: two workers admit at most two at once
    assert 1 <= statuses.count(200) <= 2
    assert rejected and all(r.json()["type"] == "/_gateway/problems/bulkhead-full" for r in rejected)
    assert all(r.headers["Retry-After"] == "1" for r in rejected)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _RssWatch:
    """Samples the peak resident memory of the gateway's workers while a transfer runs."""

    def __init__(self, pids):
        self.pids = pids
        self.base = {pid: _rss_kib(pid) for pid in pids}
        self.peak = dict(self.base)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self):
        while not self.stop.wait(0.02):
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], _rss_kib(pid))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def growth_mib(self) -> float:
        return max(self.peak[pid] - self.base[pid] for pid in self.pids) / 1024


def test_a_200_mb_download_streams_without_being_held_in_memory(gateway):
    size = 200 * 2**20
    with (
        _RssWatch(gateway.worker_pids()) as watch,
        requests.get(f"{gateway.url}/bulk/bytes/{size}", stream=True) as response,
    ):
        assert response.status_code == 200
        assert response.headers["Content-Length"] == str(size)
        received = sum(len(chunk) for chunk in response.iter_content(2**20))
    assert received == size
    assert watch.growth_mib < 40, f"a worker grew by {watch.growth_mib:.0f} MiB"


class _Zeros:
    """A 100 MiB request body with a known length, produced as it is sent."""

    size = 100 * 2**20

    def __len__(self):
        return self.size

    def __iter__(self):
        block = b"\0" * 2**20
        for _ in range(self.size // len(block)):
            yield block


def test_a_100_mb_upload_streams_without_being_held_in_memory(gateway):
    with _RssWatch(gateway.worker_pids()) as watch:
        response = requests.post(f"{gateway.url}/bulk/count", data=_Zeros())
    assert response.json() == {"received": _Zeros.size}
    assert watch.growth_mib < 40, f"a worker grew by {watch.growth_mib:.0f} MiB"


def test_every_access_line_is_written_when_the_workers_stop_under_load(start_gateway, routes, shared):
    # The workers write their log lines from a thread of their own; a graceful stop must not
    # lose the lines still queued. 16 clients keep sending until SIGTERM stops the gateway:
    # every request answered has its line.
    gateway = start_gateway(routes, workers=2, **shared)
    answered: list[str] = []
    stopping = threading.Event()

    def client(n: int) -> None:
        with requests.Session() as session:
            for k in range(10_000):
                request_id = f"burst-{n}-{k}"
                try:
                    response = session.get(f"{gateway.url}/healthz", headers={"X-Request-ID": request_id}, timeout=5)
                except requests.RequestException:
                    if stopping.is_set():
                        return
                    raise
                if response.status_code == 200:
                    answered.append(request_id)

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client, n) for n in range(16)]
        time.sleep(1.0)
        stopping.set()
        assert services.stop(gateway.process) == 0
        for done in clients:
            done.result()

    logged = [line["request_id"] for line in gateway.log_lines() if line.get("request_id", "").startswith("burst-")]
    assert len(answered) > 100
    assert set(answered) <= set(logged) and len(logged) == len(set(logged))


def test_breaker_state_is_shared_by_workers_and_gateways_and_closes_after_a_probe(gateway, second_gateway):
    for _ in range(3):  # fail_max: 3 consecutive failure statuses open the breaker
        assert requests.get(f"{gateway.url}/breakable/status/503").status_code == 503

    time.sleep(0.3)  # past GATEWAY_BREAKER_SYNC_INTERVAL (0.2 s): every worker has re-read the state
    ids = [f"open-{uuid.uuid4().hex}" for _ in range(30)]
    rejected = [requests.get(f"{gateway.url}/breakable/get", headers={"X-Request-ID": i}) for i in ids]
    assert all(r.status_code == 503 for r in rejected)
    assert all(r.json()["type"] == "/_gateway/problems/breaker-open" for r in rejected)
    assert all(1 <= int(r.headers["Retry-After"]) <= 4 for r in rejected)
    time.sleep(0.3)
    pids = {line["pid"] for line in gateway.log_lines() if line.get("request_id") in ids}
    assert len(pids) == 2, "both gunicorn workers answered from the open breaker"

    elsewhere = requests.get(f"{second_gateway.url}/breakable/get")
    assert elsewhere.status_code == 503 and elsewhere.json()["type"] == "/_gateway/problems/breaker-open"

    # Past reset_timeout the next request is the probe. The timeout is 4 s, of which Redis's
    # opening time in whole seconds may take up to 1: the 30 rejections above must fit in the
    # rest, which a loaded machine did not manage with 2 s. Polled for, not slept out.
    def probed():
        answer = requests.get(f"{second_gateway.url}/breakable/get")
        assert answer.status_code in (200, 503), answer.text
        return answer if answer.status_code == 200 else None

    probe = services.wait_until(probed, 10, "the probe let through", interval=0.2)
    assert probe.status_code == 200
    after = [requests.get(f"{url}/breakable/get").status_code for url in (gateway.url, second_gateway.url) * 5]
    assert after == [200] * 10
