"""Circuit breakers per target (pybreaker), their state shared through Redis when configured."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from app.gateway.schema import Strict
from app.gateway.types import UpstreamUnreachable
from app.observability import metrics

if TYPE_CHECKING:
    import pybreaker
    import redis

log = logging.getLogger("frontdoor.breaker")


class Breaker(Strict):
    """Circuit breaker per target: opens after ``fail_max`` consecutive failures."""

    fail_max: Annotated[int, Field(ge=1)] = 5
    reset_timeout: Annotated[float, Field(gt=0)] = 30.0  # seconds open before a half-open probe
    failure_statuses: tuple[Annotated[int, Field(ge=500, le=599)], ...] = (500, 502, 503, 504)


class TargetFailure(Exception):
    """An attempt the breaker counts as failed: a connection error, a timeout or a failure status."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One look at a breaker: its state, consecutive failures, and when it opened (epoch seconds)."""

    state: str
    failures: int
    opened_at: float | None
    forced: bool = False  # held open by an operator (the admin API) until they close it


# pybreaker's state names (pybreaker.STATE_*): this module imports pybreaker, and so redis, only
# when breakers are built, so that loading a route file (``python -m app.gateway.check``) does not.
CLOSED, OPEN = "closed", "open"
_FALLBACK = Reading(CLOSED, 0, None)  # what a breaker reads as without its store
_HELD_OPEN = Reading(OPEN, 0, None, forced=True)  # what the balancer sees of a held breaker


@functools.cache
def _pybreaker_parts() -> tuple[type, type]:
    """pybreaker's Redis storage and listener as the gateway extends them (imported on first use)."""
    import pybreaker
    import redis

    class _SharedStorage(pybreaker.CircuitRedisStorage):
        """pybreaker's Redis storage that also survives Redis being down at start-up.

        pybreaker falls back to ``closed`` when Redis errors during reads, but its constructor
        (SETNX of the initial keys) raises; a gateway must start, and report Redis in /readyz.
        """

        @property
        def probe_key(self) -> str:
            return self._namespace("probe")

        @property
        def keys(self) -> tuple[str, str, str]:
            """The Redis keys of state, failure counter and opening time, as pybreaker names them."""
            return (self._namespace("state"), self._namespace("fail_counter"), self._namespace("opened_at"))

        def _initialize_redis_state(self, state: str) -> None:
            try:
                super()._initialize_redis_state(state)
            except redis.RedisError:
                log.warning("breaker state store unreachable; falling back to closed", extra={"breaker": self._namespace_name})


    class _LogTransitions(pybreaker.CircuitBreakerListener):
        """Logs each state change this process makes and counts it in the metrics."""

        def __init__(self, upstream: str, target: str):
            self.labels = (upstream, target)

        def state_change(self, cb, old_state, new_state) -> None:
            log.warning(
                "breaker state change",
                extra={"breaker": cb.name, "from_state": getattr(old_state, "name", None), "to_state": new_state.name},
            )
            metrics.BREAKER_TRANSITIONS.labels(*self.labels, new_state.name).inc()
            metrics.BREAKER_STATE.labels(*self.labels).set(metrics.BREAKER_STATES.get(new_state.name, 0))

    return _SharedStorage, _LogTransitions


class TargetBreakers:
    """One pybreaker CircuitBreaker per target of one upstream.

    With ``redis_client`` the state (counters, state, opened-at) lives in Redis under
    ``{key_prefix}:breaker:{upstream}:{target}``, so every gunicorn worker and every gateway
    instance sees and moves one state; without it the state is this process's own.

    Reads of the shared state are kept for ``sync_interval`` seconds per process. Every
    failure still goes to Redis at once (pybreaker reads and writes the shared state) and
    drops the kept reading, so a process notices an opened breaker on its own next failure
    at the latest; only successes ride on a reading up to ``sync_interval`` old, and a
    success sent to an open target is at worst an early probe. An opening or closing made
    elsewhere is seen by every process within ``sync_interval``.

    Once ``reset_timeout`` has passed, one request at a time is let through as the half-open
    probe (``claim_probe``), across all processes when shared; a claim lapses after
    ``probe_ttl`` seconds (the upstream's connect plus read timeout) if its owner never
    reports. When Redis does not answer, breakers read as closed for ``REDIS_BACKOFF``
    seconds without asking again, and outcomes are not recorded: requests keep flowing.

    ``held_open`` is the process's set of breaker names (``upstream:target``) an operator
    holds open through the admin API (``app.gateway.control`` keeps it in step in every
    process): such a target reads as open, with no half-open probe, until it is closed again.
    """

    REDIS_BACKOFF = 1.0  # seconds

    def __init__(
        self,
        upstream: str,
        targets: tuple[str, ...],
        config: Breaker,
        redis_client: redis.Redis | None = None,
        key_prefix: str = "frontdoor",
        sync_interval: float = 0.0,
        probe_ttl: float = 30.0,
        held_open: set[str] | frozenset[str] = frozenset(),
    ):
        import pybreaker
        import redis

        self.config = config
        self._shared, listener = _pybreaker_parts()
        self._store_errors = redis.RedisError
        self._tripped = pybreaker.CircuitBreakerError
        self.held_open = held_open
        self.sync_interval = sync_interval if redis_client is not None else 0.0
        self.probe_ttl = probe_ttl
        self._redis = redis_client
        self._kept: dict[str, tuple[float, Reading]] = {}
        self._redis_down_until = 0.0  # time.monotonic() before which Redis is not asked
        self._probes: dict[str, float] = {}  # in-process probe claims: target -> expiry
        self._probe_lock = threading.Lock()
        self.breakers: dict[str, pybreaker.CircuitBreaker] = {}
        for target in targets:
            name = f"{upstream}:{target}"
            storage = (
                self._shared(CLOSED, redis_client, namespace=f"{key_prefix}:breaker:{name}")
                if redis_client is not None
                else pybreaker.CircuitMemoryStorage(CLOSED)
            )
            self.breakers[target] = pybreaker.CircuitBreaker(
                fail_max=config.fail_max,
                reset_timeout=config.reset_timeout,
                state_storage=storage,
                listeners=[listener(upstream, target)],
                name=name,
                throw_new_error_on_trip=False,
            )

    def read(self, target: str) -> Reading:
        """``target``'s breaker as the store has it now: one round trip when shared in Redis.

        pybreaker reads state, counter and opening time with a command each; on the hot path
        the three come in one MGET. A Redis error reads as closed, as pybreaker falls back.
        A breaker held open by an operator reads as open, and ``forced``.
        """
        if self.held_open and self.breakers[target].name in self.held_open:
            return _HELD_OPEN
        if self._redis is None:
            return self._fetch(target)
        if self._redis_unreachable():
            return _FALLBACK
        kept = self._kept.get(target)
        if kept is not None and time.monotonic() - kept[0] < self.sync_interval:
            return kept[1]
        reading = self._fetch(target)
        self._kept[target] = (time.monotonic(), reading)  # after the fetch: it may have taken long
        return reading

    def _redis_unreachable(self) -> bool:
        return time.monotonic() < self._redis_down_until

    def _mark_redis_down(self, exc: redis.RedisError) -> None:
        if not self._redis_unreachable():
            log.warning(
                "breaker state store unreachable; breakers read as closed",
                extra={"error": type(exc).__name__, "retry_in_s": self.REDIS_BACKOFF},
            )
        self._redis_down_until = time.monotonic() + self.REDIS_BACKOFF

    def _fetch(self, target: str) -> Reading:
        storage = self.breakers[target]._state_storage
        if not isinstance(storage, self._shared):
            opened_at = storage.opened_at
            return Reading(storage.state, storage.counter, opened_at.timestamp() if opened_at else None)
        try:
            state, failures, opened_at = storage._redis.mget(storage.keys)
        except self._store_errors as exc:
            self._mark_redis_down(exc)
            return _FALLBACK
        return Reading(
            state.decode() if state else CLOSED,
            int(failures or 0),
            float(opened_at) if opened_at else None,
        )

    def open_for(self, target: str, reading: Reading | None = None) -> float:
        """Seconds until ``target``'s breaker lets a half-open probe through; 0 when it is usable.

        ``reading`` is a ``read(target)`` already made for this request, to save a round trip.
        """
        reading = reading or self.read(target)
        if reading.forced:
            return max(self.config.reset_timeout, 1.0)  # no end is known: the time to a probe, as a hint
        if reading.state != OPEN or reading.opened_at is None:
            return 0.0
        return max(reading.opened_at + self.config.reset_timeout - time.time(), 0.0)

    def claim_probe(self, target: str) -> bool:
        """Take the single half-open probe of ``target``; False when another request holds it.

        Shared through Redis (``SET NX`` with a ``probe_ttl`` expiry) when configured, else
        in this process. Released by ``record`` once the probe's outcome is known.
        """
        storage = self.breakers[target]._state_storage
        if isinstance(storage, self._shared):
            try:
                return bool(storage._redis.set(storage.probe_key, 1, nx=True, px=int(self.probe_ttl * 1000)))
            except self._store_errors as exc:
                self._mark_redis_down(exc)
                return True  # as if closed: requests keep flowing while Redis is away
        now = time.monotonic()
        with self._probe_lock:
            if self._probes.get(target, 0.0) > now:
                return False
            self._probes[target] = now + self.probe_ttl
            return True

    def _release_probe(self, target: str) -> None:
        storage = self.breakers[target]._state_storage
        if isinstance(storage, self._shared):
            with contextlib.suppress(self._store_errors):
                storage._redis.delete(storage.probe_key)
        else:
            self._probes.pop(target, None)

    def state(self, target: str) -> str:
        """``closed``, ``open`` or ``half-open``, as the shared store says."""
        return self.breakers[target].current_state

    def describe(self, target: str) -> Reading:
        """``target``'s breaker as its store has it now (no kept reading), ``forced`` when an
        operator holds it open: what the admin API shows."""
        reading = self._fetch(target)
        if self.held_open and self.name(target) in self.held_open:
            return Reading(OPEN, reading.failures, reading.opened_at, forced=True)
        return reading

    @property
    def shared(self) -> bool:
        """True when the state lives in Redis, the same for every process."""
        return self._redis is not None

    def name(self, target: str) -> str:
        """``upstream:target``: the breaker's name in logs, Redis keys and ``held_open``."""
        return self.breakers[target].name

    def set_state(self, target: str, state: str) -> None:
        """Move ``target``'s breaker to ``open`` (its opening time now) or ``closed`` (failures
        reset) in its store, as a trip or a recovery would: the transition is logged and
        counted in the metrics. Redis errors are raised (redis.RedisError)."""
        breaker = self.breakers[target]
        if state == OPEN:
            breaker.open()
        else:
            breaker.close()
            self._release_probe(target)
        self._kept.pop(target, None)

    def record(self, target: str, failure: Exception | None, reading: Reading | None = None) -> None:
        """Feed one attempt's outcome to ``target``'s breaker (None: success).

        The attempt itself runs outside pybreaker: its ``call`` holds a lock for the whole
        call, which would serialise every request to a target within a worker. A success on
        a breaker that ``reading`` saw closed with no failures counted changes nothing, so it
        is not written (pybreaker would reset the counter to the 0 it already is).
        """
        closed = reading is not None and reading.state == CLOSED
        if failure is None and closed and not reading.failures:
            return
        if self._redis is not None and self._redis_unreachable():
            return  # pybreaker would try (and log) each of its commands in turn
        self._kept.pop(target, None)
        # pybreaker re-raises the failure it was fed (or CircuitBreakerError as it trips);
        # the caller already has the outcome, so both are expected here.
        with contextlib.suppress(TargetFailure, UpstreamUnreachable, self._tripped):
            self.breakers[target].call(_outcome, failure)
        if reading is not None and not closed:
            self._release_probe(target)  # this attempt was the half-open probe


def _outcome(failure: Exception | None) -> None:
    if failure is not None:
        raise failure


def retry_after(seconds: float) -> str:
    """Whole seconds for a ``Retry-After`` header (RFC 9110 section 10.2.3), at least 1."""
    return str(max(1, math.ceil(seconds)))
