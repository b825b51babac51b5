"""Rate limits on the proxy path: the limits library's storage, one round trip per request.

Each limit string (a route's ``rate_limit``, a plan, the default) is parsed once into a
``Quota``. A request is then counted with one call to the storage: on Redis a Lua script that
tries the quota's limits in order, smallest window first, stops at the first one used up (as
flask-limiter does), and returns what each left, so the RateLimit fields need no second trip.
The keys and the arithmetic are limits' own (``SlidingWindowCounterRateLimiter``,
``MovingWindowRateLimiter``), and the storage is flask-limiter's for the gateway's own API: one
consumer has one budget across proxied routes and the API.

Headers (draft-ietf-httpapi-ratelimit-headers-08 sections 3 and 4, and the de facto
``X-RateLimit-*``), on every answer the request was counted for::

    RateLimit-Policy: "pro-1s";q=20;w=1, "pro-60s";q=600;w=60
    RateLimit: "pro-1s";r=19;t=1, "pro-60s";r=599;t=60
    X-RateLimit-Limit: 20
    X-RateLimit-Remaining: 19
    X-RateLimit-Reset: 1795000000      (epoch seconds)

and ``Retry-After`` (seconds) when a limit is used up.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, WindowStats, parse_many
from limits.storage import RedisStorage, Storage
from limits.strategies import (
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from redis.exceptions import NoScriptError

from app.gateway.direct import ThreadConnections

# limits' acquire_sliding_window.lua for several limits in one call. KEYS: each limit's
# previous and current window keys, in pairs; ARGV: each limit's amount, expiry (seconds) and
# cost. Returns, per limit tried: acquired (0/1), previous count, previous TTL (ms), current
# count, current TTL (ms); it stops after the first limit that is used up.
SLIDING_WINDOW = """
local out = {}
for i = 1, #KEYS / 2 do
    local previous_key, current_key = KEYS[2 * i - 1], KEYS[2 * i]
    local limit = tonumber(ARGV[3 * i - 2])
    local expiry = tonumber(ARGV[3 * i - 1]) * 1000
    local amount = tonumber(ARGV[3 * i])
    local current_ttl = tonumber(redis.call('pttl', current_key))
    if current_ttl > 0 and current_ttl < expiry then
        -- the current window is over: it becomes the previous one
        redis.call('rename', current_key, previous_key)
        redis.call('set', current_key, 0, 'PX', current_ttl + expiry)
    end
    local previous_count = tonumber(redis.call('get', previous_key)) or 0
    local previous_ttl = math.max(tonumber(redis.call('pttl', previous_key)), 0)
    local current_count = tonumber(redis.call('get', current_key)) or 0
    current_ttl = math.max(tonumber(redis.call('pttl', current_key)), 0)
    local weighted = math.floor(previous_count * previous_ttl / expiry) + current_count
    local acquired = 0
    if amount <= limit and weighted + amount <= limit then
        if redis.call('exists', current_key) == 1 then
            current_count = redis.call('incrby', current_key, amount)
        else
            redis.call('set', current_key, amount, 'PX', expiry * 2)
            current_count, current_ttl = amount, expiry * 2
        end
        acquired = 1
    end
    table.insert(out, acquired)
    table.insert(out, previous_count)
    table.insert(out, previous_ttl)
    table.insert(out, current_count)
    table.insert(out, current_ttl)
    if acquired == 0 then
        break
    end
end
return out
"""

# limits' acquire_moving_window.lua (a list of hit timestamps, newest first) for several
# limits in one call, answering how many hits each window holds and when its oldest leaves.
# KEYS: one list per limit; ARGV: the time (epoch seconds), then each limit's amount, expiry
# (seconds) and cost. Returns, per limit tried: acquired (0/1), the oldest timestamp in the
# window (a string), the hits in it; it stops after the first limit that is used up.
MOVING_WINDOW = """
local timestamp = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS do
    local key = KEYS[i]
    local limit = tonumber(ARGV[3 * i - 1])
    local expiry = tonumber(ARGV[3 * i])
    local amount = tonumber(ARGV[3 * i + 1])
    local acquired = 0
    if amount <= limit then
        local entry = redis.call('lindex', key, limit - amount)
        if not (entry and tonumber(entry) >= timestamp - expiry) then
            for _ = 1, amount do
                redis.call('lpush', key, timestamp)
            end
            redis.call('ltrim', key, 0, limit - 1)
            redis.call('expire', key, expiry)
            acquired = 1
        end
    end
    -- binary search for the oldest entry still in the window, as limits' moving_window.lua does
    local low, high, found = 0, math.min(redis.call('llen', key), limit) - 1, nil
    while low <= high do
        local mid = math.floor((low + high) / 2)
        local value = tonumber(redis.call('lindex', key, mid))
        if value and value >= timestamp - expiry then
            found = mid
            low = mid + 1
        else
            high = mid - 1
        end
    end
    table.insert(out, acquired)
    if found == nil then
        table.insert(out, tostring(timestamp))
        table.insert(out, 0)
    else
        table.insert(out, tostring(redis.call('lindex', key, found)))
        table.insert(out, found + 1)
    end
    if acquired == 0 then
        break
    end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Quota:
    """One policy's limits, parsed once: ``items`` smallest window first (the order they are
    tried in), each with its label in the headers; ``policy`` is the RateLimit-Policy field."""

    name: str
    items: tuple[RateLimitItem, ...]
    labels: tuple[str, ...]
    policy: str

    @classmethod
    def parse(cls, name: str, limit: str) -> Quota:
        """``limit`` in the limits library's notation (``"600/minute;20/second"``); several
        limits are told apart by their window: ``"pro-1s"``, ``"pro-60s"``. Raises ValueError."""
        parsed = parse_many(limit)
        if len(parsed) == 1:
            labels = {parsed[0]: name}
        else:
            labels = {item: f"{name}-{item.get_expiry()}s" for item in parsed}
        policy = ", ".join(f'"{labels[item]}";q={item.amount};w={item.get_expiry()}' for item in parsed)
        ordered = tuple(sorted(parsed, key=lambda item: item.GRANULARITY.seconds))  # stable, as flask-limiter
        return cls(name, ordered, tuple(labels[item] for item in ordered), policy)


@dataclass(slots=True)
class Counted:
    """What counting one request left: each limit tried, in order, as (label, item, window,
    acquired); ``breached`` is the first one used up, if any."""

    quota: Quota
    tried: list[tuple[str, RateLimitItem, WindowStats, bool]]

    @property
    def breached(self) -> tuple[str, RateLimitItem, WindowStats, bool] | None:
        last = self.tried[-1] if self.tried else None
        return last if last is not None and not last[3] else None

    def headers(self, now: float | None = None) -> list[tuple[str, str]]:
        """The RateLimit fields for the answer (and ``Retry-After`` when a limit is used up)."""
        now = time.time() if now is None else now
        states = ", ".join(
            f'"{label}";r={max(window.remaining, 0)};t={max(math.ceil(window.reset_time - now), 0)}'
            for label, _, window, _ in self.tried
        )
        shown = self.breached or self.tried[0]
        _, item, window, _ = shown
        fields = [
            ("RateLimit-Policy", self.quota.policy),
            ("RateLimit", states),
            ("X-RateLimit-Limit", str(item.amount)),
            ("X-RateLimit-Remaining", str(max(window.remaining, 0))),
            ("X-RateLimit-Reset", str(math.ceil(window.reset_time))),
        ]
        if self.breached is not None:
            fields.append(("Retry-After", str(max(math.ceil(window.reset_time - now), 1))))
        return fields


class ScriptCall:
    """One Lua script, run on the calling thread's own Redis connection (``ThreadConnections``).
    A script Redis does not know (it restarted, or its scripts were flushed) is sent whole with
    EVAL, which loads it."""

    def __init__(self, client, source: str):
        self.connections = ThreadConnections(client)
        self.source = source
        self.sha = client.register_script(source).sha

    def __call__(self, keys: list[str], args: list) -> list:
        """The script's answer. Raises redis.RedisError."""
        try:
            return self.connections.execute("EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return self.connections.execute("EVAL", self.source, len(keys), *keys, *args)


class Counter:
    """Counts hits against limits on a limits ``Storage`` with a limits strategy.

    On Redis with the sliding window counter or the moving window: one Lua call per request,
    whatever the number of limits. Otherwise (the in-process storage, the fixed window): the
    strategy's own ``hit`` and ``get_window_stats``, per limit.
    """

    def __init__(self, strategy: RateLimiter, storage: Storage):
        self.strategy = strategy
        self.storage = storage
        self.script: ScriptCall | None = None
        if isinstance(storage, RedisStorage):
            if isinstance(strategy, SlidingWindowCounterRateLimiter):
                self.script = ScriptCall(storage.get_connection(), SLIDING_WINDOW)
            elif isinstance(strategy, MovingWindowRateLimiter):
                self.script = ScriptCall(storage.get_connection(), MOVING_WINDOW)

    def hit(self, items: tuple[RateLimitItem, ...], identifiers: tuple[str, ...], cost: int = 1) -> list[tuple[WindowStats, bool]]:
        """Count ``cost`` hits against each of ``items`` in order, keyed by ``identifiers``,
        until one is used up; return (window after the attempt, acquired) per item tried.
        Raises the storage's errors (redis.RedisError, limits.errors.StorageError)."""
        if self.script is None:
            tried = []
            for item in items:
                acquired = self.strategy.hit(item, *identifiers, cost=cost)
                tried.append((self.strategy.get_window_stats(item, *identifiers), acquired))
                if not acquired:
                    break
            return tried
        keys = [item.key_for(*identifiers) for item in items]
        if isinstance(self.strategy, SlidingWindowCounterRateLimiter):
            return self._sliding(items, keys, cost)
        return self._moving(items, keys, cost)

    def _sliding(self, items, keys, cost) -> list[tuple[WindowStats, bool]]:
        storage = self.storage
        redis_keys, args = [], []
        for item, key in zip(items, keys, strict=True):
            redis_keys += [storage.prefixed_key(storage._previous_window_key(key)), storage.prefixed_key(storage._current_window_key(key))]
            args += [item.amount, item.get_expiry(), cost]
        answer = self.script(redis_keys, args)
        now = time.time()
        tried = []
        for index, item in enumerate(items[: len(answer) // 5]):
            acquired, previous, previous_ttl, current, current_ttl = answer[5 * index : 5 * index + 5]
            tried.append((sliding_stats(item, int(previous), int(previous_ttl) / 1000, int(current), int(current_ttl) / 1000, now), bool(acquired)))
        return tried

    def _moving(self, items, keys, cost) -> list[tuple[WindowStats, bool]]:
        args: list = [time.time()]
        for item in items:
            args += [item.amount, item.get_expiry(), cost]
        answer = self.script([self.storage.prefixed_key(key) for key in keys], args)
        tried = []
        for index, item in enumerate(items[: len(answer) // 3]):
            acquired, oldest, count = answer[3 * index : 3 * index + 3]
            tried.append((WindowStats(float(oldest) + item.get_expiry(), item.amount - int(count)), bool(acquired)))
        return tried


def sliding_stats(item: RateLimitItem, previous: int, previous_ttl: float, current: int, current_ttl: float, now: float) -> WindowStats:
    """What a sliding window counter has left, from its two windows' counts and TTLs
    (seconds): ``SlidingWindowCounterRateLimiter.get_window_stats``'s arithmetic."""
    expiry = item.get_expiry()
    remaining = max(0, item.amount - math.floor(previous * previous_ttl / expiry + current))
    if not (previous or current):
        return WindowStats(now, remaining)
    previous_reset_in = previous_ttl % (expiry / previous) if previous else math.inf
    # A counter made by this very hit has 2 x expiry to live: its window ends in ``expiry``
    # (limits reads the TTL back a moment later, just under it, and gets the same).
    current_reset_in = (current_ttl % expiry or expiry) if current else math.inf
    return WindowStats(now + min(previous_reset_in, current_reset_in), remaining)
