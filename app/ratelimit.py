"""Rate limits per consumer: which limit applies, the proxy's counting (``RateLimits``, through
``app.gateway.ratelimit``), and flask-limiter for the gateway's own API, on one storage.

The limit that applies to a request is, most specific first: its route's ``rate_limit``; its
consumer's plan (``RATELIMIT_PLANS``); the ``anonymous`` plan for callers without credentials;
``RATELIMIT_DEFAULT``. A route's limit is counted per consumer on that route; the others per
consumer across every route. Anonymous callers are counted by client IP, as ProxyFix reports it
after ``TRUSTED_PROXY_HOPS`` (Heroku's router is one hop).

The strategy is ``RATELIMIT_STRATEGY``: the sliding window counter by default (two counters
per limit and consumer, whatever the rate), or the moving window (exact, one list entry per hit
in the window). The headers are those of ``app.gateway.ratelimit.Counted``, on every response
a limit applied to, 429s included.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import redis
from flask import Flask, current_app, g, request
from flask_limiter import Limit, Limiter
from flask_limiter.errors import RateLimitExceeded
from limits import RateLimitItem, WindowStats, parse_many
from limits.errors import StorageError
from limits.storage import Storage
from limits.strategies import RateLimiter
from werkzeug.wrappers import Response

from app.errors import ProblemError, problem_response, problem_type
from app.extensions import REDIS_SOCKET_TIMEOUT, redis_client
from app.gateway.ratelimit import Counted, Counter, Quota
from app.observability.metrics import RATELIMIT_REJECTED, RATELIMIT_STORAGE_UNAVAILABLE

if TYPE_CHECKING:
    from app.gateway.routefile import Route
    from app.identity import Principal

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


class CountingStrategy:
    """The configured limits strategy, remembering what each hit left of its window.

    flask-limiter asks the strategy for ``hit`` while checking the request and for
    ``get_window_stats`` when headers are written, two storage round trips, the second after
    the upstream has answered, when concurrent requests have moved the count on. This counts
    through the proxy's ``Counter`` (one round trip that also returns the window) and answers
    ``get_window_stats`` with the numbers taken at the hit.
    """

    def __init__(self, strategy: RateLimiter, storage: Storage):
        self.strategy = strategy
        self.counter = Counter(strategy, storage)

    @staticmethod
    def _taken() -> dict[str, WindowStats]:
        ctx = g._get_current_object()
        taken = ctx.get("ratelimit_windows")
        if taken is None:
            taken = ctx.ratelimit_windows = {}
        return taken

    def hit(self, item: RateLimitItem, *identifiers: str, cost: int = 1) -> bool:
        ((window, acquired),) = self.counter.hit((item,), identifiers, cost)
        self._taken()[item.key_for(*identifiers)] = window
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
    """The configured limit strings, validated and parsed once; picks the one for a request."""

    def __init__(self, default: str, plans: dict[str, str]):
        self.default = _checked("RATELIMIT_DEFAULT", default)
        self.plans = {name: _checked(f"RATELIMIT_PLANS[{name!r}]", value) for name, value in plans.items()}
        self._quotas: dict[tuple[str, str], Quota] = {}
        for name, limit in [("default", self.default), ("anonymous", self.plans.get("anonymous", "")), *self.plans.items()]:
            self.quota(name, limit)

    def prepare(self, routes: Iterable[Route]) -> None:
        """Parse the routes' own limits now (at load), not on their first request."""
        for route in routes:
            if route.rate_limit and route.rate_limit != "none":
                self.quota("route", route.rate_limit)

    def quota(self, name: str, limit: str) -> Quota | None:
        """The parsed ``limit`` under the policy ``name``; None for "" (no limit)."""
        if not limit:
            return None
        quota = self._quotas.get((name, limit))
        if quota is None:
            quota = self._quotas[(name, limit)] = Quota.parse(name, limit)
        return quota

    def current(self) -> tuple[str, str, str]:
        """(policy name, limit string, counting scope) for this request of the gateway's own
        API; "" means no limit."""
        ctx = g._get_current_object()
        chosen = ctx.get("rate_policy")
        if chosen is None:
            chosen = ctx.rate_policy = self.choose(None, ctx.get("principal"))
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


class RateLimits:
    """Counts a proxied request against its policy's limits: one storage round trip, through
    the same storage, keys and strategy as flask-limiter's counting of the gateway's own API."""

    def __init__(self, policies: Policies, counter: Counter, outage: StorageOutage, key_prefix: str):
        self.policies = policies
        self.counter = counter
        self.outage = outage
        self.prefix = (key_prefix,) if key_prefix else ()  # as flask-limiter keys its counters

    def count(self, route: Route, principal: Principal | None, client_ip: str) -> Counted | None:
        """Count one call by ``principal`` (None: anonymous, counted by ``client_ip``) to
        ``route``. Returns what it left (``Counted.breached`` when a limit is used up), or None
        when no limit applies or the storage is down and the limiter fails open. Raises
        RateLimitUnavailable (503) when the storage is down and the limiter fails closed."""
        name, limit, scope = self.policies.choose(route, principal)
        quota = self.policies.quota(name, limit)
        if quota is None:
            return None
        if self.outage.skipping():
            self.outage.failed(None)
            return None
        key = principal.consumer_id if principal is not None else "ip:" + (client_ip or "unknown")
        try:
            tried = self.counter.hit(quota.items, (*self.prefix, key, scope))
        except STORAGE_ERRORS as exc:
            self.outage.failed(exc)
            return None
        self.outage.recovered()
        return Counted(quota, [(label, item, window, acquired) for label, item, (window, acquired) in zip(quota.labels, quota.items, tried, strict=False)])

    def standing(self, principal: Principal, routes: Iterable[Route]) -> list[dict]:
        """What is left now of each limit that applies to ``principal``, counting nothing: its
        plan's (or the default) limit across the gateway's API and every route without a limit
        of its own, then each route's own. ``[{"policy", "applies_to", "limit", "remaining",
        "reset_in"}]``; ``remaining`` (requests) and ``reset_in`` (seconds) are None while the
        storage cannot be read."""
        shared = self.policies.choose(None, principal)
        chosen = [(shared, "the gateway's API and every route without a limit of its own")]
        chosen += [(self.policies.choose(route, principal), f"route {route.label}") for route in routes if route.rate_limit not in (None, "none")]
        standing = []
        for (name, limit, scope), applies_to in chosen:
            quota = self.policies.quota(name, limit)
            for item in quota.items if quota is not None else ():
                entry = {"policy": name, "applies_to": applies_to, "limit": str(item), "remaining": None, "reset_in": None}
                try:
                    window = self.counter.strategy.get_window_stats(item, *self.prefix, principal.consumer_id, scope)
                except STORAGE_ERRORS:
                    window = None
                if window is not None:
                    entry["remaining"] = max(window.remaining, 0)
                    if window.remaining < item.amount:  # an untouched window resets at no particular time
                        entry["reset_in"] = max(math.ceil(window.reset_time - time.time()), 0)
                standing.append(entry)
        return standing

    @staticmethod
    def rejection(counted: Counted, route_label: str) -> RateLimited:
        """The 429 for a request whose ``counted`` limit is used up (RATELIMIT_REJECTED counts it)."""
        RATELIMIT_REJECTED.labels(route_label).inc()
        _, item, _, _ = counted.breached
        return RateLimited(f"The rate limit {item} ({counted.quota.name!r} policy) is used up; retry after Retry-After seconds")


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
    """429: a rate limit that applies to the caller (its plan's, the route's, or the gateway API's) is used up for now; Retry-After says in how many seconds the window has room again, and the RateLimit fields say which limit it was."""

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


def _headers(response: Response) -> Response:
    """after_request: the RateLimit fields for every limit this request was counted against."""
    limiter: GatewayLimiter = current_app.extensions["ratelimit_limiter"]
    limits = limiter.current_limits
    if not limits:
        return response
    try:
        windows = [limit.window for limit in limits]  # as counted at the hit
    except STORAGE_ERRORS:
        return response  # the request was counted; only its headers are lost
    name, limit_string, _ = _policies().current()
    quota = _policies().quota(name, limit_string)
    label_of = dict(zip(quota.items, quota.labels, strict=True))
    # flask-limiter stops at the first limit a request exceeds: a 429 reports the limits it
    # evaluated, while the policy field always lists them all.
    counted = Counted(quota, [(label_of.get(limit.limit, name), limit.limit, window, not limit.breached) for limit, window in zip(limits, windows, strict=True)])
    for field, value in counted.headers():
        response.headers[field] = value
    return response


def _too_many_requests(error: RateLimitExceeded) -> Response:
    RATELIMIT_REJECTED.labels(request.endpoint or "").inc()
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
    # The proxy counts through the same storage, strategy, keys and outage policy.
    app.extensions["ratelimit_proxy"] = RateLimits(app.extensions["ratelimit"], limiter.limiter.counter, limiter.outage, limiter._key_prefix)
    app.after_request(_headers)
    app.register_error_handler(RateLimitExceeded, _too_many_requests)
