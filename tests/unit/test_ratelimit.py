"""Rate limits as a client sees them: which limit applies, the RateLimit headers, 429s, storage outages."""
from __future__ import annotations

import logging
import re
import time

import pytest

from app.ratelimit import STORAGE_RETRY_INTERVAL
from tests import services
from tests.factories import Identity
from tests.services import logged
from tests.stub_upstream import StubUpstream

LIMIT_HEADERS = ("RateLimit-Policy", "RateLimit", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After")
UNAVAILABLE = "frontdoor_ratelimit_storage_unavailable_total"
REJECTED = "frontdoor_ratelimit_rejected_total"


def routes(upstream_url: str) -> str:
    """The route file: the stub upstream behind routes with the default limit, their own, or none."""
    return f"""
upstreams:
  up:
    targets: ["{upstream_url}"]
routes:
  - {{path: /open, upstream: up, auth: optional}}
  - {{path: /private, upstream: up, auth: required}}
  - {{path: /narrow, upstream: up, auth: optional, rate_limit: "2/minute"}}
  - {{path: /unlimited, upstream: up, auth: optional, rate_limit: none}}
  - {{path: /burst, upstream: up, auth: optional, rate_limit: "2/2second"}}
"""



@pytest.fixture
def upstream():
    with StubUpstream() as stub:
        stub.add("GET", re.compile("/.*"), body=b"up")
        yield stub


@pytest.fixture
def gateway(make_app, upstream):
    """An app serving ``routes`` with the given config: ``gateway(RATELIMIT_DEFAULT="3/minute")``.

    With the moving window unless the test names a strategy: it counts exactly at any moment.
    The default, the sliding window counter, keeps its in-process windows on the clock's
    boundaries (the limits library's memory storage), where a burst that straddles one may be
    let through one request more; its own tests are below.
    """

    def build(**config):
        config.setdefault("RATELIMIT_STRATEGY", "moving-window")
        return make_app(routes=routes(upstream.url), **config)

    return build


def metric(client, name: str, **labels: str) -> float:
    """A counter's value as ``/metrics`` shows it; 0.0 before its first increment."""
    response = client.get("/metrics")
    assert response.status_code == 200
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(selector)}\}} (\S+)$", response.get_data(as_text=True), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def state(response) -> dict[str, tuple[int, int]]:
    """The RateLimit field as ``{policy: (remaining, seconds to reset)}``."""
    items = re.findall(r'"([^"]+)";r=(\d+);t=(\d+)', response.headers["RateLimit"])
    return {name: (int(remaining), int(reset)) for name, remaining, reset in items}


def assert_unlimited(response) -> None:
    assert response.status_code == 200
    assert response.data == b"up"
    assert not [name for name in LIMIT_HEADERS if name in response.headers]


def assert_rate_limited(response) -> None:
    assert response.status_code == 429
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json["type"] == "/_gateway/problems/rate-limited"
    assert response.json["status"] == 429
    assert int(response.headers["Retry-After"]) >= 1


def with_key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


# Which limit applies


@pytest.mark.parametrize(
    ("plans", "caller", "path", "policy"),
    [
        ({}, "anonymous", "/open", '"default";q=2;w=60'),
        ({"pro": "5/minute"}, "pro", "/open", '"pro";q=5;w=60'),
        ({"pro": "5/minute"}, "no plan", "/open", '"default";q=2;w=60'),
        ({"pro": "5/minute"}, "anonymous", "/open", '"default";q=2;w=60'),
        ({"pro": "5/minute", "anonymous": "1/minute"}, "anonymous", "/open", '"anonymous";q=1;w=60'),
        ({"pro": "5/minute", "anonymous": "1/minute"}, "pro", "/narrow", '"route";q=2;w=60'),
        ({"pro": "5/minute", "anonymous": "1/minute"}, "anonymous", "/narrow", '"route";q=2;w=60'),
    ],
)
def test_the_most_specific_limit_applies(gateway, upstream, plans, caller, path, policy):
    app = gateway(RATELIMIT_DEFAULT="2/minute", RATELIMIT_PLANS=plans)
    headers = {}
    if caller != "anonymous":
        identity = Identity(app)
        headers = with_key(identity.key(identity.consumer(plan="pro" if caller == "pro" else None)))

    response = app.test_client().get(path, headers=headers)

    assert response.status_code == 200
    assert response.headers["RateLimit-Policy"] == policy


def test_a_plans_budget_is_spent_to_a_429(gateway, upstream):
    app = gateway(RATELIMIT_DEFAULT="1/minute", RATELIMIT_PLANS={"pro": "3/minute"})
    identity = Identity(app)
    key = identity.key(identity.consumer(plan="pro"))
    client = app.test_client()

    statuses = [client.get("/private", headers=with_key(key)).status_code for _ in range(4)]

    assert statuses == [200, 200, 200, 429]


def test_a_routes_limit_is_counted_apart_from_the_plans(gateway, upstream):
    app = gateway(RATELIMIT_PLANS={"pro": "5/minute"})
    identity = Identity(app)
    key = identity.key(identity.consumer(plan="pro"))
    client = app.test_client()

    narrow = [client.get("/narrow", headers=with_key(key)) for _ in range(3)]
    elsewhere = client.get("/open", headers=with_key(key))

    assert [r.status_code for r in narrow] == [200, 200, 429]
    assert "'route' policy" in narrow[2].json["detail"]
    assert elsewhere.status_code == 200
    assert state(elsewhere)["pro"][0] == 4  # the route's requests left the plan's budget whole


@pytest.mark.parametrize("caller", ["anonymous", "consumer"])
def test_a_route_with_rate_limit_none_is_never_limited(gateway, upstream, caller):
    app = gateway(RATELIMIT_DEFAULT="1/minute")
    headers = with_key(Identity(app).key()) if caller == "consumer" else {}
    client = app.test_client()

    for _ in range(5):
        assert_unlimited(client.get("/unlimited", headers=headers))
    assert client.get("/open", headers=headers).headers["X-RateLimit-Remaining"] == "0"  # nor counted


def test_an_empty_default_means_no_limit(gateway, upstream):
    client = gateway(RATELIMIT_DEFAULT="").test_client()

    for _ in range(5):
        assert_unlimited(client.get("/open"))


def test_anonymous_callers_are_counted_per_client_ip(gateway, upstream):
    client = gateway(RATELIMIT_DEFAULT="1/minute").test_client()
    first, second = {"REMOTE_ADDR": "192.0.2.1"}, {"REMOTE_ADDR": "192.0.2.2"}

    assert [client.get("/open", environ_base=first).status_code for _ in range(2)] == [200, 429]
    assert [client.get("/open", environ_base=second).status_code for _ in range(2)] == [200, 429]


@pytest.mark.parametrize(
    ("hops", "statuses"),
    [
        # Behind one trusted proxy its last X-Forwarded-For hop is the client; an entry the
        # client put before it changes nothing.
        (1, [200, 200, 429]),
        # With no trusted proxy the header is the client's own claim: the socket's address counts.
        (0, [200, 429, 429]),
    ],
)
def test_x_forwarded_for_names_the_client_only_behind_a_trusted_proxy(gateway, upstream, hops, statuses):
    client = gateway(RATELIMIT_DEFAULT="1/minute", TRUSTED_PROXY_HOPS=hops).test_client()
    proxy = {"REMOTE_ADDR": "10.0.0.1"}
    sent = ["203.0.113.7", "198.51.100.2", "198.51.100.2, 203.0.113.7"]

    seen = [client.get("/open", headers={"X-Forwarded-For": value}, environ_base=proxy).status_code for value in sent]

    assert seen == statuses


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"RATELIMIT_DEFAULT": "lots"}, "RATELIMIT_DEFAULT"),
        ({"RATELIMIT_DEFAULT": "10/minute;x"}, "RATELIMIT_DEFAULT"),
        ({"RATELIMIT_PLANS": {"free": "60/minute", "pro": "600 per fortnight"}}, "RATELIMIT_PLANS['pro']"),
    ],
)
def test_an_invalid_limit_in_the_config_stops_the_app(make_app, config, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        make_app(**config)


# The headers and the 429


@pytest.mark.parametrize("storage", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_headers_count_down_to_a_429_problem(gateway, upstream, request, storage):
    config = {"REDIS_URL": request.getfixturevalue("redis_url")} if storage == "redis" else {}
    client = gateway(RATELIMIT_DEFAULT="3/minute", **config).test_client()
    rejected = metric(client, REJECTED, route="/open")

    for left in (2, 1, 0):
        response = client.get("/open")
        assert response.status_code == 200 and response.data == b"up"
        assert response.headers["RateLimit-Policy"] == '"default";q=3;w=60'
        remaining, reset = state(response)["default"]
        assert remaining == left and 59 <= reset <= 60
        assert response.headers["X-RateLimit-Limit"] == "3"
        assert response.headers["X-RateLimit-Remaining"] == str(left)
        assert abs(int(response.headers["X-RateLimit-Reset"]) - (time.time() + reset)) <= 1
        assert "Retry-After" not in response.headers

    refused = client.get("/open")

    assert_rate_limited(refused)
    assert 59 <= int(refused.headers["Retry-After"]) <= 60
    assert "'default' policy" in refused.json["detail"]
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert len(upstream.calls) == 3
    assert metric(client, REJECTED, route="/open") == rejected + 1


@pytest.mark.redis
def test_the_default_sliding_window_on_redis_starts_at_the_first_hit(gateway, upstream, redis_url):
    client = gateway(RATELIMIT_DEFAULT="3/minute", RATELIMIT_STRATEGY="sliding-window-counter", REDIS_URL=redis_url).test_client()

    answers = [client.get("/open") for _ in range(4)]

    assert [response.status_code for response in answers] == [200, 200, 200, 429]
    assert [state(response)["default"] for response in answers[:3]] == [(2, 60), (1, 60), (0, 60)]
    assert 59 <= int(answers[3].headers["Retry-After"]) <= 60
    assert answers[3].headers["RateLimit-Policy"] == '"default";q=3;w=60'


def test_the_default_sliding_window_in_process_resets_on_the_clocks_window(gateway, upstream):
    client = gateway(RATELIMIT_DEFAULT="3/minute", RATELIMIT_STRATEGY="sliding-window-counter").test_client()
    if time.time() % 60 > 58:
        time.sleep(60 - time.time() % 60 + 0.05)  # the three requests fall in one window

    answers = [client.get("/open") for _ in range(3)]

    assert [state(response)["default"][0] for response in answers] == [2, 1, 0]
    boundary = (int(time.time()) // 60 + 1) * 60  # the in-process windows follow the clock
    for response in answers:
        assert abs(int(response.headers["X-RateLimit-Reset"]) - boundary) <= 1


def test_each_of_several_limits_is_a_policy_in_one_header(gateway, upstream):
    client = gateway(RATELIMIT_DEFAULT="3/10second;100/minute").test_client()

    seen = [client.get("/open") for _ in range(4)]

    for response, left in zip(seen, (2, 1, 0), strict=False):
        assert response.status_code == 200
        assert response.headers["RateLimit-Policy"] == '"default-10s";q=3;w=10, "default-60s";q=100;w=60'
        remaining = {name: r for name, (r, _) in state(response).items()}
        assert remaining == {"default-10s": left, "default-60s": 97 + left}
        assert response.headers["X-RateLimit-Limit"] == "3"  # the shortest window's
        assert response.headers["X-RateLimit-Remaining"] == str(left)
    assert_rate_limited(seen[3])
    assert 1 <= int(seen[3].headers["Retry-After"]) <= 10


def test_a_429_names_its_policy_as_the_responses_before_it_did(gateway, upstream):
    client = gateway(RATELIMIT_DEFAULT="3/10second;100/minute").test_client()

    seen = [client.get("/open") for _ in range(4)]

    assert seen[3].status_code == 429
    assert state(seen[3])["default-10s"][0] == 0


def test_retry_after_is_long_enough(gateway, upstream):
    client = gateway().test_client()  # /burst: 2/2second
    assert [client.get("/burst").status_code for _ in range(2)] == [200, 200]
    refused = client.get("/burst")
    assert_rate_limited(refused)
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 2

    time.sleep(wait)

    assert client.get("/burst").status_code == 200


# Whose budget


def test_each_consumer_has_a_budget_of_its_own(gateway, upstream):
    app = gateway(RATELIMIT_DEFAULT="2/minute")
    identity = Identity(app)
    first, second = identity.key(), identity.key()
    client = app.test_client()

    spent = [client.get("/private", headers=with_key(first)).status_code for _ in range(3)]
    other = [client.get("/private", headers=with_key(second)) for _ in range(3)]
    anonymous = client.get("/open")

    assert spent == [200, 200, 429]
    assert [r.status_code for r in other] == [200, 200, 429]
    assert other[0].headers["X-RateLimit-Remaining"] == "1"
    assert anonymous.headers["X-RateLimit-Remaining"] == "1"  # the client IP's budget is apart too


def test_two_keys_of_one_consumer_share_its_budget(gateway, upstream):
    app = gateway(RATELIMIT_DEFAULT="2/minute")
    identity = Identity(app)
    consumer = identity.consumer()
    first, second = identity.key(consumer), identity.key(consumer)
    client = app.test_client()

    statuses = [client.get("/private", headers=with_key(key)).status_code for key in (first, second, first, second)]

    assert statuses == [200, 200, 429, 429]


def test_the_key_api_spends_the_consumers_budget(gateway, upstream):
    app = gateway(RATELIMIT_DEFAULT="3/minute")
    key = Identity(app).key()
    client = app.test_client()

    proxied = client.get("/private", headers=with_key(key))
    listed = client.get("/_gateway/keys", headers=with_key(key))
    client.get("/private", headers=with_key(key))
    refused = client.get("/_gateway/keys", headers=with_key(key))

    assert proxied.headers["X-RateLimit-Remaining"] == "2"
    assert listed.status_code == 200 and len(listed.json["data"]) == 1
    assert listed.headers["X-RateLimit-Remaining"] == "1"
    assert_rate_limited(refused)


def test_probes_and_scrapes_are_never_limited_nor_counted(gateway, upstream):
    client = gateway(RATELIMIT_DEFAULT="1/minute").test_client()

    for path in ("/healthz", "/readyz", "/metrics") * 3:
        response = client.get(path)
        assert response.status_code == 200, path
        assert "RateLimit" not in response.headers and "X-RateLimit-Limit" not in response.headers
    assert client.get("/open").headers["X-RateLimit-Remaining"] == "0"
    assert_rate_limited(client.get("/open"))
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200


# The storage unreachable


@pytest.mark.redis
def test_an_unreachable_storage_fails_open_logs_once_and_recovers(gateway, upstream, own_redis):
    client = gateway(REDIS_URL=own_redis.url, RATELIMIT_DEFAULT="3/minute").test_client()
    assert state(client.get("/open"))["default"][0] == 2
    allowed = metric(client, UNAVAILABLE, outcome="allowed")

    own_redis.stop()
    with logged("frontdoor.ratelimit") as records:
        for _ in range(10):
            assert_unlimited(client.get("/open"))
        assert metric(client, UNAVAILABLE, outcome="allowed") == allowed + 10
        [warning] = records.messages("rate-limit storage unreachable")
        assert warning.levelno == logging.WARNING
        assert warning.getMessage() == "rate-limit storage unreachable: requests are let through without a limit"

        own_redis.start()
        restarted = time.monotonic()
        while "RateLimit" not in (response := client.get("/open")).headers:
            assert_unlimited(response)
            # Within the retry interval, with room for a loaded machine (polled: a pass costs nothing).
            assert time.monotonic() - restarted < STORAGE_RETRY_INTERVAL + 2.0, "limits did not apply again"
            time.sleep(0.02)
        assert records.messages("rate-limit storage reachable again")
        assert len(records.messages("rate-limit storage unreachable")) == 1

    # The restarted server kept nothing: the budget starts afresh and is spent again.
    assert state(response)["default"][0] == 2
    assert [client.get("/open").status_code for _ in range(3)] == [200, 200, 429]


@pytest.mark.redis
def test_an_unreachable_storage_fails_closed_with_a_503(gateway, upstream, own_redis):
    client = gateway(REDIS_URL=own_redis.url, RATELIMIT_DEFAULT="100/minute", RATELIMIT_FAIL_OPEN=False).test_client()
    assert client.get("/open").status_code == 200
    refused = metric(client, UNAVAILABLE, outcome="refused")

    own_redis.stop()
    answers = [client.get("/open") for _ in range(3)]

    for response in answers:
        assert response.status_code == 503
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json["type"] == "/_gateway/problems/rate-limit-unavailable"
        assert response.headers["Retry-After"] == "1"
    assert len(upstream.calls) == 1  # nothing reached the upstream while limits could not be checked
    assert metric(client, UNAVAILABLE, outcome="refused") == refused + 3

    own_redis.start()
    time.sleep(STORAGE_RETRY_INTERVAL + 0.1)  # the backoff after the last failed try
    recovered = client.get("/open")
    assert recovered.status_code == 200 and "RateLimit" in recovered.headers


def unreachable() -> str:
    return f"redis://127.0.0.1:{services.free_port()}/0"  # nothing listens on a port just released


def test_probes_and_unlimited_routes_answer_while_the_storage_is_down_failing_closed(gateway, upstream):
    client = gateway(REDIS_URL=unreachable(), RATELIMIT_DEFAULT="100/minute", RATELIMIT_FAIL_OPEN=False).test_client()
    assert client.get("/open").status_code == 503  # the storage was tried and found down

    answers = {path: client.get(path) for path in ("/healthz", "/metrics", "/unlimited", "/readyz")}

    assert answers["/healthz"].status_code == 200
    assert answers["/metrics"].status_code == 200
    assert answers["/unlimited"].status_code == 200 and answers["/unlimited"].data == b"up"
    assert answers["/readyz"].json["detail"] == "Not ready: redis unreachable"  # its own verdict


def test_scrapes_during_an_outage_are_not_counted_as_unlimited_requests(gateway, upstream):
    client = gateway(REDIS_URL=unreachable(), RATELIMIT_DEFAULT="100/minute").test_client()
    assert_unlimited(client.get("/open"))

    first = metric(client, UNAVAILABLE, outcome="allowed")

    assert first >= 1
    assert metric(client, UNAVAILABLE, outcome="allowed") == first


def test_a_probe_during_an_outage_does_not_report_the_storage_reachable(gateway, upstream):
    client = gateway(REDIS_URL=unreachable(), RATELIMIT_DEFAULT="100/minute").test_client()

    with logged("frontdoor.ratelimit") as records:
        assert_unlimited(client.get("/open"))
        time.sleep(STORAGE_RETRY_INTERVAL + 0.1)  # past the backoff: the next request may try the storage
        assert client.get("/healthz").status_code == 200
        assert_unlimited(client.get("/unlimited"))
        assert_unlimited(client.get("/open"))

    assert records.messages("rate-limit storage reachable again") == []
    assert len(records.messages("rate-limit storage unreachable")) == 1
