"""Rate limits across real gateway processes on one Redis: exact counts, honest Retry-After, outages."""
from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from app import create_app
from tests import services
from tests.conftest import delete_keys
from tests.factories import Identity

pytestmark = [pytest.mark.slow, pytest.mark.redis]

ROUTES = """
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 5.0}}
routes:
  - {{path: /limited, upstream: httpbin, strip_prefix: true, auth: required, rate_limit: "40/minute"}}
  - {{path: /burst, upstream: httpbin, strip_prefix: true, auth: optional, rate_limit: "3/2second"}}
  - {{path: /open, upstream: httpbin, strip_prefix: true, auth: optional, rate_limit: "5/minute"}}
  - {{path: /fast, upstream: httpbin, strip_prefix: true, auth: required, rate_limit: "1000/second"}}
"""
UNAVAILABLE = "frontdoor_ratelimit_storage_unavailable_total"


@pytest.fixture(scope="module")
def routes(httpbin_url):
    return ROUTES.format(httpbin=httpbin_url)


@pytest.fixture(scope="module")
def identity(routes, tmp_path_factory) -> Identity:
    """A SQLite database with the gateway's tables, for gateway processes to share;
    ``identity.key()`` stores a new consumer's key in it."""
    root = tmp_path_factory.mktemp("limits-db")
    (root / "gateway.yaml").write_text(routes)
    app = create_app(
        {
            "CONFIG": str(root / "gateway.yaml"),
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{root / 'gateway.sqlite'}",
            "CELERY_BROKER_URL": "memory://",
        }
    )
    return Identity(app)


@pytest.fixture(scope="module")
def shared(redis_url, identity):
    """What two dynos share: one Redis under one key prefix, and one database."""
    prefix = services.unique("it-limits")
    database = identity.app.config["SQLALCHEMY_DATABASE_URI"]
    yield {"REDIS_URL": redis_url, "GATEWAY_KEY_PREFIX": prefix, "DATABASE_URL": database}
    delete_keys(redis_url, prefix)


@pytest.fixture(scope="module", params=["sliding-window-counter", "moving-window"])
def gateways(request, routes, start_gateway, shared):
    """Two gateway processes on one Redis and one database, counting with each strategy."""
    prefix = f"{shared['GATEWAY_KEY_PREFIX']}-{request.param}"  # each strategy's counters apart
    env = {**shared, "GATEWAY_KEY_PREFIX": prefix, "GATEWAY_RATELIMIT_STRATEGY": request.param}
    return [start_gateway(routes, workers=2, **env) for _ in range(2)]


def spread(gateways, path: str, key: str, count: int = 100) -> list[requests.Response]:
    """Send ``count`` requests for ``path`` at once (16 at a time), alternately to each gateway."""
    urls = [f"{gateway.url}{path}" for gateway in gateways] * (count // len(gateways))
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda url: requests.get(url, headers={"X-API-Key": key}, timeout=10), urls))


def test_two_gateways_count_one_budget_exactly(gateways, identity):
    answers = spread(gateways, "/limited/get", identity.key())

    served = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert (len(served), len(refused)) == (40, 60)
    assert all(r.json()["url"].endswith("/get") for r in served)  # httpbin answered them
    for response in refused:
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["type"] == "/_gateway/problems/rate-limited"
        assert int(response.headers["Retry-After"]) >= 1


def test_each_request_served_reports_the_budget_its_own_hit_left(gateways, identity):
    # The upstream takes 0.3 s: the other requests in flight are counted meanwhile.
    answers = spread(gateways, "/limited/delay/0.3", identity.key())

    served = [r for r in answers if r.status_code == 200]
    assert len(served) == 40
    assert sorted(int(r.headers["X-RateLimit-Remaining"]) for r in served) == list(range(40))


def test_a_429s_retry_after_is_followed_by_success(gateways):
    url = f"{gateways[0].url}/burst/get"  # 3/2second per client IP
    assert [requests.get(url, timeout=5).status_code for _ in range(3)] == [200, 200, 200]
    refused = requests.get(url, timeout=5)
    assert refused.status_code == 429
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 2

    time.sleep(wait)

    again = requests.get(f"{gateways[1].url}/burst/get", timeout=5)  # the other process, same budget
    assert again.status_code == 200
    assert again.headers["RateLimit-Policy"] == '"route";q=3;w=2'


def ratelimit_keys(client: redis.Redis, prefix: str, consumer_id: str) -> dict[bytes, int]:
    """The consumer's rate-limit keys under ``prefix``, with the bytes Redis holds for each."""
    keys = client.scan_iter(f"{prefix}:ratelimit:*{consumer_id}*", count=1000)
    return {key: client.memory_usage(key) or 0 for key in keys}


def test_a_high_rate_limit_keeps_a_constant_number_of_keys_per_consumer_under_load(request, gateways, shared, identity):
    # The sliding window counter (the default) keeps two small counters per limit and consumer
    # whatever the rate; the moving window one list, of at most the limit's entries.
    strategy = request.node.callspec.params["gateways"]
    prefix = f"{shared['GATEWAY_KEY_PREFIX']}-{strategy}"
    key = identity.key()
    urls = [f"{gateway.url}/fast/get" for gateway in gateways]
    consumer_id = requests.get(f"{gateways[0].url}/fast/headers", headers={"X-API-Key": key}, timeout=5).json()["headers"]["X-Consumer-Id"]
    client = redis.Redis.from_url(shared["REDIS_URL"])
    seen: list[dict[bytes, int]] = []
    stop = time.monotonic() + 2.5  # bounded: 2.5 s of load, at most 16 x 200 requests

    def load(worker: int) -> int:
        sent = 0
        while time.monotonic() < stop and sent < 200:
            answer = requests.get(urls[worker % 2], headers={"X-API-Key": key}, timeout=5)
            assert answer.status_code in (200, 429)
            sent += 1
        return sent

    try:
        with ThreadPoolExecutor(16) as pool:
            sent = pool.map(load, range(16))
            while time.monotonic() < stop:
                seen.append(ratelimit_keys(client, prefix, consumer_id))
                time.sleep(0.2)
            total = sum(sent)
        lengths = [client.llen(name) for name in seen[-1]] if strategy == "moving-window" else []
    finally:
        client.close()
    assert total > 100, "the load reached the gateways"
    assert len(seen) >= 5
    if strategy == "sliding-window-counter":
        for keys in seen:
            assert 1 <= len(keys) <= 2, keys  # the current window's counter, and the previous one's
            assert sum(keys.values()) < 1024  # bytes, whatever the rate
    else:
        assert all(len(keys) == 1 for keys in seen), seen
        assert 0 < lengths[0] <= 1000  # one entry per request in the last second, at most the limit


def unavailable_allowed(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=5).text
    found = re.search(rf'^{UNAVAILABLE}{{outcome="allowed"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def lone_gateway(routes, start_gateway, own_redis):
    """A gateway on ``own_redis`` with one worker, so that /metrics shows the counters of the
    process that served the requests. Stopped before the Redis server is."""
    gateway = start_gateway(routes, workers=1, REDIS_URL=own_redis.url)
    yield gateway
    services.stop(gateway.process)


def test_a_redis_outage_fails_open_and_limits_resume_when_it_returns(lone_gateway, own_redis):
    gateway = lone_gateway
    url = f"{gateway.url}/open/get"
    assert [requests.get(url, timeout=5).headers["X-RateLimit-Remaining"] for _ in range(2)] == ["4", "3"]
    allowed = unavailable_allowed(gateway.url)

    own_redis.stop()
    during = [requests.get(url, timeout=5) for _ in range(20)]

    for response in during:
        assert response.status_code == 200 and response.json()["url"].endswith("/get")
        assert "RateLimit" not in response.headers and "X-RateLimit-Remaining" not in response.headers
    # The log is written by the worker's log thread: polled for (it was a fixed 0.2 s).
    unreachable = services.wait_until(
        lambda: [line for line in gateway.log_lines() if line.get("msg", "").startswith("rate-limit storage unreachable")],
        10, "the unreachable line",
    )
    assert len(unreachable) == 1
    assert unreachable[0]["level"] == "warning" and unreachable[0]["logger"] == "frontdoor.ratelimit"
    assert unavailable_allowed(gateway.url) == allowed + 20

    own_redis.start()
    restarted = time.monotonic()
    while "X-RateLimit-Remaining" not in (response := requests.get(url, timeout=5)).headers:
        assert response.status_code == 200
        # Within the 1 s retry interval, with room for a loaded machine (polled: a pass costs nothing).
        assert time.monotonic() - restarted < 5, "limits did not apply again within 5 s of Redis returning"
        time.sleep(0.05)
    resumed = [response] + [requests.get(url, timeout=5) for _ in range(5)]

    # The restarted server kept nothing: the budget of 5 is spent afresh, then 429.
    assert [r.headers.get("X-RateLimit-Remaining") for r in resumed[:5]] == ["4", "3", "2", "1", "0"]
    assert resumed[5].status_code == 429 and int(resumed[5].headers["Retry-After"]) >= 1
    services.wait_until(
        lambda: any(line.get("msg", "").startswith("rate-limit storage reachable again") for line in gateway.log_lines()),
        10, "the reachable-again line",
    )
