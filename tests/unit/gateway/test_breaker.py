"""Circuit breakers per target: when they open, for how long, and their state shared through Redis."""
from __future__ import annotations

import time
import uuid

import pytest
import redis

from app.extensions import new_redis
from app.gateway.balancer import balance
from app.gateway.breaker import TargetBreakers, TargetFailure, retry_after
from app.gateway.routefile import Breaker
from app.gateway.types import BreakerOpen, UpstreamTimeout
from tests.unit.gateway.stand_ins import Answers, make_request

A, B = "http://a.internal", "http://b.internal"


def failure() -> TargetFailure:
    return TargetFailure("status 503")


def test_a_new_breaker_is_closed_and_usable():
    breakers = TargetBreakers("svc", (A, B), Breaker())

    assert breakers.state(A) == "closed"
    assert breakers.open_for(A) == 0.0


def test_the_breaker_opens_after_fail_max_consecutive_failures():
    breakers = TargetBreakers("svc", (A, B), Breaker(fail_max=3, reset_timeout=30))

    for _ in range(2):
        breakers.record(A, failure())
    assert breakers.state(A) == "closed"
    breakers.record(A, UpstreamTimeout("slow"))

    assert breakers.state(A) == "open"
    assert 29 < breakers.open_for(A) <= 30
    assert breakers.state(B) == "closed"  # each target has its own breaker


def test_a_success_resets_the_failure_count():
    breakers = TargetBreakers("svc", (A,), Breaker(fail_max=2))

    for _ in range(3):
        breakers.record(A, failure())
        breakers.record(A, None)

    assert breakers.state(A) == "closed"


def test_after_reset_timeout_a_successful_probe_closes_the_breaker():
    breakers = TargetBreakers("svc", (A,), Breaker(fail_max=1, reset_timeout=0.2))
    breakers.record(A, failure())
    assert breakers.open_for(A) > 0

    time.sleep(0.25)
    assert breakers.open_for(A) == 0.0  # a probe may go through
    breakers.record(A, None)

    assert breakers.state(A) == "closed"


def test_a_failed_probe_opens_the_breaker_for_another_reset_timeout():
    breakers = TargetBreakers("svc", (A,), Breaker(fail_max=1, reset_timeout=0.2))
    breakers.record(A, failure())
    time.sleep(0.25)

    breakers.record(A, failure())

    assert breakers.state(A) == "open"
    assert 0.1 < breakers.open_for(A) <= 0.2


@pytest.mark.parametrize(("seconds", "header"), [(0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (29.6, "30")])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(seconds, header):
    assert retry_after(seconds) == header


def test_breakers_fall_back_to_closed_when_redis_is_down_at_start_up():
    # built as app.extensions builds the gateway's client
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        breakers = TargetBreakers("svc", (A,), Breaker(fail_max=1), client, key_prefix="unreachable")

        breakers.record(A, failure())

        assert breakers.state(A) == "closed"
        assert breakers.open_for(A) == 0.0
    finally:
        client.close()


@pytest.fixture
def shared_prefix(redis_url):
    """A key prefix unique to the test; every key under it is deleted afterwards."""
    prefix = f"frontdoor-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def two_processes(redis_url, shared_prefix):
    """Two TargetBreakers for one upstream as two gateway processes would build them."""
    clients = [redis.Redis.from_url(redis_url, socket_timeout=1) for _ in range(2)]
    config = Breaker(fail_max=2, reset_timeout=30)
    yield [TargetBreakers("svc", (A, B), config, client, key_prefix=shared_prefix) for client in clients]
    for client in clients:
        client.close()


@pytest.mark.redis
def test_a_breaker_opened_in_one_process_is_open_in_another(two_processes, redis_url, shared_prefix):
    first, second = two_processes

    first.record(A, failure())
    second.record(A, failure())  # the count is shared: this is the second consecutive failure

    assert first.state(A) == "open"
    assert second.state(A) == "open"
    assert 28 < second.open_for(A) <= 30
    assert second.state(B) == "closed"
    client = redis.Redis.from_url(redis_url)
    try:
        keys = {key.decode() for key in client.scan_iter(match=f"{shared_prefix}*")}
    finally:
        client.close()
    assert keys and all(key.startswith(f"{shared_prefix}:breaker:svc:") for key in keys)


@pytest.mark.redis
def test_the_other_process_balances_away_from_the_open_target(two_processes):
    first, second = two_processes
    for _ in range(2):
        first.record(A, failure())
    upstream = Answers(200)
    handle = balance("svc", (A, B), second)(upstream)

    for _ in range(3):
        handle(make_request())

    assert upstream.targets == [B, B, B]
    for _ in range(2):
        first.record(B, failure())
    with pytest.raises(BreakerOpen) as caught:
        handle(make_request())
    assert caught.value.headers["Retry-After"] in {"29", "30"}


@pytest.fixture
def synced_processes(redis_url, shared_prefix):
    """Two processes that keep breaker readings for 0.2 s, as the gateway does with Redis."""
    clients = [redis.Redis.from_url(redis_url, socket_timeout=1) for _ in range(2)]
    config = Breaker(fail_max=2, reset_timeout=30)
    yield [
        TargetBreakers("svc", (A,), config, client, key_prefix=shared_prefix, sync_interval=0.2) for client in clients
    ]
    for client in clients:
        client.close()


@pytest.mark.redis
def test_an_opening_elsewhere_is_seen_within_the_sync_interval(synced_processes):
    first, second = synced_processes
    assert second.open_for(A, second.read(A)) == 0  # second keeps a "closed" reading
    first.record(A, failure())
    first.record(A, failure())

    assert first.state(A) == "open"
    time.sleep(0.25)
    assert 28 < second.open_for(A, second.read(A)) <= 30


@pytest.mark.redis
def test_a_failure_reaches_the_shared_state_at_once_despite_a_kept_reading(synced_processes):
    first, second = synced_processes
    kept = second.read(A)
    first.record(A, failure())
    second.record(A, failure(), kept)  # second consecutive failure, counted in Redis: opens

    assert first.state(A) == "open"
    assert second.open_for(A, second.read(A)) > 28  # the failure dropped second's kept reading


@pytest.mark.redis
def test_only_one_process_gets_the_half_open_probe(redis_url, shared_prefix):
    clients = [redis.Redis.from_url(redis_url, socket_timeout=1) for _ in range(2)]
    first, second = (
        TargetBreakers("svc", (A,), Breaker(fail_max=1, reset_timeout=1), client, key_prefix=shared_prefix, probe_ttl=5)
        for client in clients
    )
    try:
        first.record(A, failure())
        time.sleep(1.1)
        assert first.claim_probe(A) is True
        assert second.claim_probe(A) is False
        first.record(A, None, first.read(A))  # the probe succeeded: closed, probe released
        assert second.state(A) == "closed"
        assert second.claim_probe(A) is True  # a claim is free again for the next time
    finally:
        for client in clients:
            client.close()


def test_an_unresponsive_redis_is_asked_once_per_backoff_not_per_request():
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    client = new_redis(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=0.2)
    asked: list[str] = []  # every command sent (or pipeline made) on the client
    execute_command, pipeline = client.execute_command, client.pipeline

    def counted(*args, **kwargs):
        asked.append(str(args[0]))
        return execute_command(*args, **kwargs)

    def counted_pipeline(*args, **kwargs):
        asked.append("pipeline")
        return pipeline(*args, **kwargs)

    client.execute_command, client.pipeline = counted, counted_pipeline
    try:
        breakers = TargetBreakers("svc", (A,), Breaker(), client, key_prefix="silent", sync_interval=0.2)
        asked.clear()  # pybreaker's own setup asked on construction
        started = time.monotonic()
        assert breakers.read(A).state == "closed"  # waits out the socket timeout once
        first = time.monotonic() - started
        assert asked == ["MGET"]
        started = time.monotonic()
        for _ in range(20):
            assert breakers.open_for(A, breakers.read(A)) == 0
            breakers.record(A, failure())
        rest = time.monotonic() - started
    finally:
        client.close()
        silent.close()
    assert first >= 0.2
    # Not once more in 20 rounds: counted at the client rather than read from the time taken,
    # and allowing one ask per REDIS_BACKOFF had the rounds been slowed past it.
    assert len(asked) <= 1 + int(rest / TargetBreakers.REDIS_BACKOFF), (len(asked), rest)
