"""The proxy's rate-limit counter: limits' own arithmetic in one Redis call, and its headers."""
from __future__ import annotations

import math
import time

import pytest
import redis
from limits import WindowStats, parse, parse_many
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from app.gateway.ratelimit import Counted, Counter, Quota, ScriptCall

IDS = ("con_test", "route:/things")


def test_a_quota_tries_the_smallest_window_first_and_names_each_limit_by_its_window():
    quota = Quota.parse("pro", "600/minute;20/second")

    assert [str(item) for item in quota.items] == ["20 per 1 second", "600 per 1 minute"]
    assert quota.labels == ("pro-1s", "pro-60s")
    # The policy field lists the limits as configured.
    assert quota.policy == '"pro-60s";q=600;w=60, "pro-1s";q=20;w=1'
    assert Quota.parse("route", "5/minute").labels == ("route",)


def test_the_headers_name_every_limit_tried_and_the_first_used_up():
    quota = Quota.parse("pro", "2/second;600/minute")
    now = 1_000.0
    second, minute = quota.items

    counted = Counted(quota, [("pro-1s", second, WindowStats(now + 0.4, 0), False)])
    fields = dict(counted.headers(now))

    assert fields["RateLimit"] == '"pro-1s";r=0;t=1'
    assert fields["X-RateLimit-Limit"] == "2" and fields["X-RateLimit-Remaining"] == "0"
    assert fields["X-RateLimit-Reset"] == "1001"
    assert fields["Retry-After"] == "1"  # never 0: "now" is always too early
    counted = Counted(quota, [("pro-1s", second, WindowStats(now + 1, 1), True), ("pro-60s", minute, WindowStats(now + 60, 599), True)])
    fields = dict(counted.headers(now))
    assert fields["RateLimit"] == '"pro-1s";r=1;t=1, "pro-60s";r=599;t=60'
    assert "Retry-After" not in fields


@pytest.fixture
def storage(redis_url, key_prefix):
    store = RedisStorage(redis_url, key_prefix=f"{key_prefix}:ratelimit")
    yield store
    store.storage.close()


@pytest.mark.redis
@pytest.mark.parametrize("strategy_class", [SlidingWindowCounterRateLimiter, MovingWindowRateLimiter])
def test_one_call_counts_as_limits_strategy_does_and_reads_back_the_same_window(storage, strategy_class):
    strategy = strategy_class(storage)
    counter = Counter(strategy, storage)
    item = parse("5/minute")
    assert counter.script is not None

    tried = [counter.hit((item,), IDS) for _ in range(7)]

    assert [acquired for ((_, acquired),) in tried] == [True] * 5 + [False] * 2
    assert [window.remaining for ((window, _),) in tried] == [4, 3, 2, 1, 0, 0, 0]
    # limits reads the very counters this script wrote: the same count, the same reset.
    stats = strategy.get_window_stats(item, *IDS)
    assert stats.remaining == 0
    assert strategy.test(item, *IDS) is False
    assert math.isclose(stats.reset_time, tried[-1][0][0].reset_time, abs_tol=1.0)
    assert 59 <= tried[0][0][0].reset_time - time.time() <= 60


@pytest.mark.redis
def test_several_limits_stop_at_the_first_used_up_and_count_nothing_after_it(storage):
    counter = Counter(SlidingWindowCounterRateLimiter(storage), storage)
    second, minute = sorted(parse_many("2/second;100/minute"), key=lambda item: item.GRANULARITY.seconds)

    answers = [counter.hit((second, minute), IDS) for _ in range(3)]

    assert [[acquired for _, acquired in tried] for tried in answers] == [[True, True], [True, True], [False]]
    assert answers[1][1][0].remaining == 98  # the third call was never counted against the minute
    assert SlidingWindowCounterRateLimiter(storage).get_window_stats(minute, *IDS).remaining == 98


def test_in_process_the_strategy_itself_counts():
    storage = MemoryStorage()
    counter = Counter(SlidingWindowCounterRateLimiter(storage), storage)
    item = parse("2/minute")

    assert counter.script is None
    assert [counter.hit((item,), IDS)[0][1] for _ in range(3)] == [True, True, False]


@pytest.mark.redis
def test_a_script_redis_forgot_and_a_connection_redis_closed_are_both_recovered(own_redis):
    client = redis.Redis.from_url(own_redis.url)
    call = ScriptCall(client, "return #KEYS + #ARGV")
    try:
        assert call(["a", "b"], [1]) == 3
        client.script_flush()  # as after a restart: the script is unknown
        assert call(["a"], [1, 2]) == 3
        client.client_kill_filter(_type="normal", skipme=True)  # the thread's connection is gone
        assert call([], []) == 0
        own_redis.stop()
        with pytest.raises(redis.ConnectionError):
            call([], [])
        own_redis.start()
        assert call(["a"], []) == 1
    finally:
        client.close()
