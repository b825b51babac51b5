"""The response cache under gunicorn with two workers sharing Redis: single flight across
processes, and stale answers while the upstream is down."""
from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from tests import services
from tests.conftest import delete_keys

pytestmark = [pytest.mark.slow, pytest.mark.redis]


class SlowUpstream:
    """An HTTP/1.0 server in the test process that takes ``delay`` seconds per request and
    answers ``{"call": n, "path": ...}``, n counting its calls; ``stop()`` takes it down."""

    def __init__(self, delay: float):
        self.seen: list[str] = []
        calls = itertools.count(1)
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(self.path)
                time.sleep(delay)
                body = json.dumps({"call": next(calls), "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def hits(self, path: str) -> int:
        return self.seen.count(path)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)


@pytest.fixture(scope="module")
def slow():
    upstream = SlowUpstream(delay=0.5)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def doomed():
    """An upstream a test takes down."""
    upstream = SlowUpstream(delay=0)
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(start_gateway, redis_url, slow, doomed):
    prefix = services.unique("it-cache")
    routes = f"""
upstreams:
  slow:
    targets: ["{slow.url}"]
    timeout: {{connect: 1.0, read: 5.0}}
  doomed:
    targets: ["{doomed.url}"]
    timeout: {{connect: 0.5, read: 1.0}}
routes:
  - path: /slow
    upstream: slow
    strip_prefix: true
    cache: {{ttl: 60}}
  - path: /flaky
    upstream: doomed
    strip_prefix: true
    cache: {{ttl: 0.5, stale_if_error: 60}}
"""
    yield start_gateway(routes, workers=2, REDIS_URL=redis_url, GATEWAY_KEY_PREFIX=prefix)
    delete_keys(redis_url, prefix)


def test_fifty_concurrent_requests_for_a_cold_key_make_one_upstream_request(gateway, slow):
    url = f"{gateway.url}/slow/item?v=1"
    start = threading.Barrier(50)

    def get(_: int) -> requests.Response:
        start.wait()
        return requests.get(url, timeout=10)

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(get, range(50)))

    assert [response.status_code for response in responses] == [200] * 50
    assert {response.content for response in responses} == {b'{"call": 1, "path": "/item?v=1"}'}
    assert slow.hits("/item?v=1") == 1
    statuses = [response.headers["Cache-Status"] for response in responses]
    assert statuses.count("frontdoor; fwd=miss; stored") == 1
    assert all(status.startswith("frontdoor; hit") for status in statuses if "fwd=miss" not in status)
    assert any(status.endswith("; collapsed") for status in statuses)  # some waited on the first


def test_a_stale_answer_stands_in_while_the_upstream_is_down(gateway, doomed):
    stored = requests.get(f"{gateway.url}/flaky/item", timeout=5)
    assert stored.headers["Cache-Status"] == "frontdoor; fwd=miss; stored"
    time.sleep(0.6)  # past the ttl of 0.5 s
    doomed.stop()

    served = requests.get(f"{gateway.url}/flaky/item", timeout=5)
    never_cached = requests.get(f"{gateway.url}/flaky/other", timeout=5)

    assert served.status_code == 200
    assert served.content == stored.content
    cache_status = served.headers["Cache-Status"]
    assert cache_status.startswith("frontdoor; fwd=stale; fwd-status=502;")
    assert cache_status.endswith("; detail=stale-if-error")
    assert 0 <= int(served.headers["Age"]) <= 2  # seconds since it was stored
    assert never_cached.status_code == 502
    assert never_cached.headers["Content-Type"] == "application/problem+json"
