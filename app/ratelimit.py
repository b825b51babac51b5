"""Rate limits per consumer with flask-limiter on the limits library's storage, and their headers.

The limit that applies to a request is, most specific first: its route's ``rate_limit``; its
consumer's plan (``RATELIMIT_PLANS``); the ``anonymous`` plan for callers without credentials;
``RATELIMIT_DEFAULT``. A route's limit is counted per consumer on that route; the others per
consumer across every route. Anonymous callers are counted by client IP, as ProxyFix reports it
after ``TRUSTED_PROXY_HOPS`` (Heroku's router is one hop).

Headers, on every response that a limit applied to (draft-ietf-httpapi-ratelimit-headers-08,
sections 3 and 4, and the older de facto ``X-RateLimit-*``)::

    RateLimit-Policy: "pro";q=600;w=60
    RateLimit: "pro";r=599;t=60
    X-RateLimit-Limit: 600
    X-RateLimit-Remaining: 599
    X-RateLimit-Reset: 1795000000      (epoch seconds)

and ``Retry-After`` (seconds) on a 429.
"""
from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis
from flask import Flask, current_app, g, request
from flask_limiter import Limit, Limiter
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItem, WindowStats, parse_many
from limits.errors import StorageError
from limits.storage import RedisStorage, Storage
from limits.strategies import MovingWindowRateLimiter, RateLimiter
from werkzeug.wrappers import Response

from app.errors import ProblemError, problem_response, problem_type
from app.extensions import REDIS_SOCKET_TIMEOUT, redis_client
from app.observability.metrics import RATELIMIT_REJECTED, RATELIMIT_STORAGE_UNAVAILABLE

if TYPE_CHECKING:
    from app.auth import Principal
    from app.gateway.routefile import Route

log = logging.getLogger("frontdoor.ratelimit")

STORAGE_ERRORS = (redis.RedisError, StorageError)
# Probes and scrapes are never limited: a load balancer must always reach them.
EXEMPT_ENDPOINTS = frozenset({"health.healthz", "health.readyz", "metrics.metrics"})
# After the storage fails, requests skip it for this long (seconds) instead of each paying
# for a refused or timed-out connection; then one request tries again.
STORAGE_RETRY_INTERVAL = 1.0


class RateLimitUnavailable(ProblemError):
    """503: the limit storage is unreachable and the gateway is configured to fail closed."""

    status, title, slug = 503, "Service Unavailable", "rate-limit-unavailable"


class StorageOutage:
    """What the limiter does while its storage is unreachable: fail open (the default) or
    closed, log once per ``log_interval`` seconds, and count each request in a metric."""

    def __init__(self, fail_open: bool, log_interval: float, clock: Callable[[], float] = time.monotonic):
        self.fail_open = fail_open
        self.log_interval = log_interval
        self.clock = clock
        self.down = False
        self._lock = threading.Lock()  # gthread: many requests report at once
        self._retry_at = 0.0
        self._logged_at: float | None = None
        self._unlimited = 0  # requests not limited since the last log line

    def skipping(self) -> bool:
        """True while the storage is known to be down, except for the one request that is let
        through to try it again once STORAGE_RETRY_INTERVAL has passed."""
        if not self.down:
            return False
        with self._lock:
            now = self.clock()
            if now < self._retry_at:
                return True
            self._retry_at = now + STORAGE_RETRY_INTERVAL  # this request probes; the rest skip
            return False

    def failed(self, error: Exception | None) -> None:
        """Record that this request could not be limited (``error`` when the storage was just
        tried). Raises RateLimitUnavailable when failing closed."""
        outcome = "allowed" if self.fail_open else "refused"
        RATELIMIT_STORAGE_UNAVAILABLE.labels(outcome).inc()
        with self._lock:
            now = self.clock()
            if error is not None:
                self._retry_at = now + STORAGE_RETRY_INTERVAL
            self.down = True
            self._unlimited += 1
            due = self._logged_at is None or now - self._logged_at >= self.log_interval
            if due:
                self._logged_at, unlimited, self._unlimited = now, self._unlimited, 0
        if due:
            log.warning(
                "rate-limit storage unreachable: requests are %s without a limit",
                "let through" if self.fail_open else "refused",
                extra={"error": repr(error) if error else None, "requests_unlimited": unlimited},
            )
        if not self.fail_open:
            raise RateLimitUnavailable(
                "Rate limits cannot be checked right now; retry shortly", headers={"Retry-After": "1"}
            )

    def recovered(self) -> None:
        if not self.down:
            return
        with self._lock:
            if not self.down:
                return
            self.down = False
            unlimited, self._unlimited = self._unlimited, 0
        # _logged_at is kept: a flapping storage still logs at most once per interval
        log.warning("rate-limit storage reachable again: limits apply", extra={"requests_unlimited": unlimited})


# The moving window of limits' acquire_moving_window.lua (a list of hit timestamps, newest
# first), extended to answer in the same round trip how many hits the window holds and when its
# oldest one leaves: the RateLimit fields then describe this request's own hit, even while other
# processes hit the same key, and cost no second round trip.
ACQUIRE_AND_COUNT = """
local timestamp = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local amount = tonumber(ARGV[4])
local acquired = 0
if amount <= limit then
    local entry = redis.call('lindex', KEYS[1], limit - amount)
    if not (entry and tonumber(entry) >= timestamp - expiry) then
        for i = 1, amount do
            redis.call('lpush', KEYS[1], timestamp)
        end
        redis.call('ltrim', KEYS[1], 0, limit - 1)
        redis.call('expire', KEYS[1], expiry)
        acquired = 1
    end
end
-- binary search for the oldest entry still in the window, as limits' moving_window.lua does
local low, high, found = 0, math.min(redis.call('llen', KEYS[1]), limit) - 1, nil
while low <= high do
    local mid = math.floor((low + high) / 2)
    local value = tonumber(redis.call('lindex', KEYS[1], mid))
    if value and value >= timestamp - expiry then
        found = mid
        low = mid + 1
    else
        high = mid - 1
    end
end
if found == nil then
    return {acquired, tostring(timestamp), 0}
end
return {acquired, tostring(redis.call('lindex', KEYS[1], found)), found + 1}
"""


class CountingStrategy:
    """The configured limits strategy, remembering what each hit left of its window.

    flask-limiter asks the strategy for ``hit`` while checking the request and for
    ``get_window_stats`` when headers are written, two storage round trips, the second after
    the upstream has answered, when concurrent requests have moved the count on. This answers
    ``get_window_stats`` with the numbers taken at the hit: for the moving window on Redis from
    the same Lua call (ACQUIRE_AND_COUNT, atomic), otherwise read right after the hit.
    """

    def __init__(self, strategy: RateLimiter, storage: Storage):
        self.strategy = strategy
        self.storage = storage
        self.script = None
        if isinstance(strategy, MovingWindowRateLimiter) and isinstance(storage, RedisStorage):
            self.script = storage.get_connection().register_script(ACQUIRE_AND_COUNT)

    @staticmethod
    def _taken() -> dict[str, WindowStats]:
        ctx = g._get_current_object()
        taken = ctx.get("ratelimit_windows")
        if taken is None:
            taken = ctx.ratelimit_windows = {}
        return taken

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        key = item.key_for(*identifiers)
        if self.script is not None:
            now = time.time()
            acquired, oldest, count = self.script(
                [self.storage.prefixed_key(key)], [now, item.amount, item.get_expiry(), cost]
            )
            self._taken()[key] = WindowStats(float(oldest) + item.get_expiry(), item.amount - int(count))
            return bool(acquired)
        acquired = self.strategy.hit(item, *identifiers, cost=cost)
        self._taken()[key] = self.strategy.get_window_stats(item, *identifiers)
        return acquired

    def test(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        return self.strategy.test(item, *identifiers, cost=cost)

    def get_window_stats(self, item: RateLimitItem, *identifiers: str) -> WindowStats:
        taken = self._taken().get(item.key_for(*identifiers))
        return taken if taken is not None else self.strategy.get_window_stats(item, *identifiers)

    def clear(self, item: RateLimitItem, *identifiers: str) -> None:
        self.strategy.clear(item, *identifiers)


class GatewayLimiter(Limiter):
    """flask-limiter, with the gateway's policy for an unreachable storage and window counts
    taken at the hit (CountingStrategy).

    flask-limiter either raises storage errors (a 500) or swallows them with a traceback per
    request and retries the storage on every request; this fails open or closed, backs off
    for STORAGE_RETRY_INTERVAL, and logs once per interval (StorageOutage).
    """

    outage: StorageOutage
    _counting: CountingStrategy | None = None

    def init_app(self, app: Flask) -> None:
        super().init_app(app)
        self._counting = CountingStrategy(super().limiter, self.storage)

    @property
    def limiter(self) -> CountingStrategy:  # flask-limiter's strategy for hit/test/get_window_stats
        return self._counting

    def _check_request_limit(self, callable_name: str | None = None, in_middleware: bool = True) -> None:
        # flask-limiter's before_request hook (Limiter.init_app registers this method).
        if _exempt():
            return  # flask-limiter's own request filters run only after tens of microseconds of set-up
        if self.outage.skipping():
            self.outage.failed(None)
            return
        try:
            super()._check_request_limit(callable_name, in_middleware)
        except STORAGE_ERRORS as exc:
            self.context.reset()  # nothing was counted: no headers for this response
            self.outage.failed(exc)
            return
        self.outage.recovered()


class Policies:
    """The configured limit strings, validated once; picks the one for the current request."""

    def __init__(self, default: str, plans: dict[str, str]):
        self.default = _checked("RATELIMIT_DEFAULT", default)
        self.plans = {name: _checked(f"RATELIMIT_PLANS[{name!r}]", value) for name, value in plans.items()}

    def current(self) -> tuple[str, str, str]:
        """(policy name, limit string, counting scope) for this request; "" means no limit."""
        ctx = g._get_current_object()
        chosen = ctx.get("rate_policy")
        if chosen is not None:
            return chosen
        match = ctx.get("match")
        chosen = ctx.rate_policy = self.choose(match.route if match is not None else None, ctx.get("principal"))
        return chosen

    def choose(self, route: Route | None, principal: Principal | None) -> tuple[str, str, str]:
        """(policy name, limit string, counting scope) for a call by ``principal`` to ``route``
        (None: a view of the gateway's own)."""
        if route is not None and route.rate_limit is not None:
            limit = route.rate_limit
            return ("route", "" if limit == "none" else limit, "route:" + route.label)
        if principal is not None and principal.plan in self.plans:
            return (principal.plan, self.plans[principal.plan], "consumer")
        if principal is None and "anonymous" in self.plans:
            return ("anonymous", self.plans["anonymous"], "consumer")
        return ("default", self.default, "consumer")


def _checked(key: str, value: str) -> str:
    if value:
        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"{key}: {value!r} is not a rate limit such as '100/minute'") from None
    return value or ""


_CALLER = object()


def limited_by(principal: object = _CALLER) -> str:
    """The counter key of ``principal`` (default: the current request's): the consumer's id,
    or ``ip:<address>`` for an anonymous caller."""
    if principal is _CALLER:
        principal = g.get("principal")
    if principal is not None:
        return principal.consumer_id
    return "ip:" + (request.remote_addr or "unknown")


def _policies() -> Policies:
    return current_app.extensions["ratelimit"]


class RateLimited(ProblemError):
    status, title, slug = 429, "Too Many Requests", "rate-limited"


class OverRateLimit(ProblemError):
    """422: a job would make more calls to a route than its rate limit allows in a whole window."""

    status, title, slug = 422, "Unprocessable Content", "over-rate-limit"


def charge(costs: list[tuple[Route, int]]) -> None:
    """Count the calls a job will make for the current caller, ``(route, calls)`` per route,
    against the counters direct calls to those routes would use, so that a job cannot send
    more than its caller could send itself. All or nothing: every counter is tested first.

    A direct call to an ``auth: none`` route is anonymous (counted by client address); so is
    its share here. The submission itself was counted once already against the caller's own
    counter; one call on that counter is not counted again.

    Raises OverRateLimit (422) when a route's limit is smaller than the calls asked of it,
    RateLimited (429 with ``Retry-After``), or RateLimitUnavailable when the storage is down
    and the limiter fails closed.
    """
    limiter: GatewayLimiter = current_app.extensions["ratelimit_limiter"]
    policies = _policies()
    caller = g.get("principal")
    submitted = (limited_by(caller), *policies.current()[1:])  # the submission's own counter
    counted = 1
    planned = []  # (item, identifiers, cost, route, policy name)
    for route, cost in costs:
        principal = caller if route.auth != "none" else None
        name, limit, scope = policies.choose(route, principal)
        key = limited_by(principal)
        if counted and (key, limit, scope) == submitted:
            cost, counted = cost - counted, 0
        if not limit or cost <= 0:
            continue
        prefix = [limiter._key_prefix] if limiter._key_prefix else []  # as flask-limiter keys it
        for item in parse_many(limit):
            if cost > item.amount:
                raise OverRateLimit(
                    f"The job would make {cost} calls to route {route.label!r}, more than its rate limit {item} allows"
                )
            planned.append((item, (*prefix, key, scope), cost, route, name))
    if not planned:
        return
    if limiter.outage.skipping():
        limiter.outage.failed(None)
        return
    strategy = limiter.limiter.strategy
    try:
        for item, identifiers, cost, route, name in planned:
            if not strategy.test(item, *identifiers, cost=cost):
                RATELIMIT_REJECTED.labels(route.label).inc()
                # Waiting for the oldest hit to leave frees one call; ``cost`` may need the window.
                reset = strategy.get_window_stats(item, *identifiers).reset_time if cost == 1 else time.time() + item.get_expiry()
                raise RateLimited(
                    f"The job would make {cost} calls to route {route.label!r}; its rate limit {item} ({name!r} policy) does not allow them now",
                    headers={"Retry-After": str(max(math.ceil(reset - time.time()), 1))},
                )
        for item, identifiers, cost, _, _ in planned:
            strategy.hit(item, *identifiers, cost=cost)
    except STORAGE_ERRORS as exc:
        limiter.outage.failed(exc)
        return
    limiter.outage.recovered()


def _exempt() -> bool:
    """True for probes, and for requests that no limit applies to: they skip the limiter."""
    return request.endpoint in EXEMPT_ENDPOINTS or not _policies().current()[1]


@functools.lru_cache(maxsize=256)
def _policy_items(limit: str, name: str) -> tuple[tuple[str, int, int], ...]:
    """(policy name, quota, window seconds) for each limit in ``limit``; several are told apart
    by their window: ``"pro-1s"``, ``"pro-60s"``. The same on every response, 429s included."""
    items = parse_many(limit)
    if len(items) == 1:
        return ((name, items[0].amount, items[0].get_expiry()),)
    return tuple((f"{name}-{item.get_expiry()}s", item.amount, item.get_expiry()) for item in items)


def _headers(response: Response) -> Response:
    """after_request: the RateLimit fields for every limit this request was counted against."""
    limiter: GatewayLimiter = current_app.extensions["ratelimit_limiter"]
    limits = limiter.current_limits
    if not limits:
        return response
    try:
        windows = [(limit, limit.window) for limit in limits]  # as counted at the hit
    except STORAGE_ERRORS:
        return response  # the request was counted; only its headers are lost
    now = time.time()
    name, limit_string, _ = _policies().current()
    items = _policy_items(limit_string, name)
    label_of = {(amount, window): label for label, amount, window in items}
    states = []
    # flask-limiter stops at the first limit a request exceeds: a 429 reports the limits it
    # evaluated, while the policy field always lists them all.
    for limit, (reset, remaining) in windows:
        label = label_of.get((limit.limit.amount, limit.limit.get_expiry()), name)
        states.append(f'"{label}";r={max(remaining, 0)};t={max(math.ceil(reset - now), 0)}')
    headers = response.headers
    headers["RateLimit-Policy"] = ", ".join(f'"{label}";q={amount};w={window}' for label, amount, window in items)
    headers["RateLimit"] = ", ".join(states)
    shown = limiter.current_limit or limits[0]
    reset, remaining = shown.window
    headers["X-RateLimit-Limit"] = str(shown.limit.amount)
    headers["X-RateLimit-Remaining"] = str(max(remaining, 0))
    headers["X-RateLimit-Reset"] = str(math.ceil(reset))
    if shown.breached:
        headers["Retry-After"] = str(max(math.ceil(reset - now), 1))
    return response


def _too_many_requests(error: RateLimitExceeded) -> Response:
    RATELIMIT_REJECTED.labels(g.get("route") or request.endpoint or "").inc()
    name = _policies().current()[0]
    return problem_response(
        429,
        "Too Many Requests",
        f"The rate limit {error.description} ({name!r} policy) is used up; retry after Retry-After seconds",
        problem_type("rate-limited"),
    )


def init_app(app: Flask) -> None:
    """Limit every request after authentication; raises ValueError on an invalid limit setting.

    Uses ``REDIS_URL`` (``RATELIMIT_STORAGE_URI`` when set) through the app's Redis connection
    pool, else ``memory://``, which counts per process.
    """
    config = app.config
    app.extensions["ratelimit"] = Policies(config["RATELIMIT_DEFAULT"], dict(config["RATELIMIT_PLANS"]))
    client = redis_client(app)
    uri = config["RATELIMIT_STORAGE_URI"] or (config["REDIS_URL"] if client is not None else "memory://")
    options: dict = {}
    if uri.startswith(("redis://", "rediss://")):
        options["key_prefix"] = f"{config['KEY_PREFIX']}:ratelimit"
        if client is not None and uri == config["REDIS_URL"]:
            options["connection_pool"] = client.connection_pool  # short timeouts, no retries
        else:
            options.update(socket_timeout=REDIS_SOCKET_TIMEOUT, socket_connect_timeout=REDIS_SOCKET_TIMEOUT)
    limiter = GatewayLimiter(
        key_func=limited_by,
        default_limits=[
            Limit(
                limit_provider=lambda: _policies().current()[1],
                key_function=limited_by,
                scope=lambda _endpoint: _policies().current()[2],
                shared=True,
            )
        ],
        storage_uri=uri,
        storage_options=options,
        strategy=config["RATELIMIT_STRATEGY"],
        headers_enabled=False,  # written by _headers: flask-limiter knows neither the IETF fields nor per-policy names
        swallow_errors=False,
    )
    limiter.outage = StorageOutage(bool(config["RATELIMIT_FAIL_OPEN"]), float(config["RATELIMIT_OUTAGE_LOG_INTERVAL"]))
    limiter.init_app(app)
    app.extensions["ratelimit_limiter"] = limiter
    app.after_request(_headers)
    app.register_error_handler(RateLimitExceeded, _too_many_requests)
