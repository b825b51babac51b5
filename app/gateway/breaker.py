"""Circuit breakers per target (pybreaker), their state shared through Redis when configured."""
from __future__ import annotations

import contextlib
import logging
import math
from datetime import UTC, datetime

import pybreaker
import redis

from app.gateway.routefile import Breaker
from app.gateway.types import UpstreamUnreachable

log = logging.getLogger("frontdoor.breaker")


class TargetFailure(Exception):
    """An attempt the breaker counts as failed: a connection error, a timeout or a failure status."""


class _SharedStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage that also survives Redis being down at start-up.

    pybreaker falls back to ``closed`` when Redis errors during reads, but its constructor
    (SETNX of the initial keys) raises; a gateway must start, and report Redis in /readyz.
    """

    def _initialize_redis_state(self, state: str) -> None:
        try:
            super()._initialize_redis_state(state)
        except redis.RedisError:
            log.warning("breaker state store unreachable; falling back to closed", extra={"breaker": self._namespace_name})


class _LogTransitions(pybreaker.CircuitBreakerListener):
    def state_change(self, cb, old_state, new_state) -> None:
        log.warning(
            "breaker state change",
            extra={"breaker": cb.name, "from_state": getattr(old_state, "name", None), "to_state": new_state.name},
        )


class TargetBreakers:
    """One pybreaker CircuitBreaker per target of one upstream.

    With ``redis_client`` the state (counters, state, opened-at) lives in Redis under
    ``{key_prefix}:breaker:{upstream}:{target}``, so every gunicorn worker and every gateway
    instance sees and moves one state; without it the state is this process's own.
    """

    def __init__(
        self,
        upstream: str,
        targets: tuple[str, ...],
        config: Breaker,
        redis_client: redis.Redis | None = None,
        key_prefix: str = "frontdoor",
    ):
        self.config = config
        self.breakers: dict[str, pybreaker.CircuitBreaker] = {}
        for target in targets:
            name = f"{upstream}:{target}"
            storage = (
                _SharedStorage(pybreaker.STATE_CLOSED, redis_client, namespace=f"{key_prefix}:breaker:{name}")
                if redis_client is not None
                else pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
            )
            self.breakers[target] = pybreaker.CircuitBreaker(
                fail_max=config.fail_max,
                reset_timeout=config.reset_timeout,
                state_storage=storage,
                listeners=[_LogTransitions()],
                name=name,
                throw_new_error_on_trip=False,
            )

    def open_for(self, target: str) -> float:
        """Seconds until ``target``'s breaker lets a half-open probe through; 0 when it is usable."""
        cb = self.breakers[target]
        if cb.current_state != pybreaker.STATE_OPEN:
            return 0.0
        opened_at = cb._state_storage.opened_at
        if opened_at is None:
            return 0.0
        remaining = (opened_at - datetime.now(UTC)).total_seconds() + cb.reset_timeout
        return max(remaining, 0.0)

    def state(self, target: str) -> str:
        """``closed``, ``open`` or ``half-open``, as the shared store says."""
        return self.breakers[target].current_state

    def record(self, target: str, failure: Exception | None) -> None:
        """Feed one attempt's outcome to ``target``'s breaker (None: success).

        The attempt itself runs outside pybreaker: its ``call`` holds a lock for the whole
        call, which would serialise every request to a target within a worker.
        """
        # pybreaker re-raises the failure it was fed (or CircuitBreakerError as it trips);
        # the caller already has the outcome, so both are expected here.
        with contextlib.suppress(TargetFailure, UpstreamUnreachable, pybreaker.CircuitBreakerError):
            self.breakers[target].call(_outcome, failure)


def _outcome(failure: Exception | None) -> None:
    if failure is not None:
        raise failure


def retry_after(seconds: float) -> str:
    """Whole seconds for a ``Retry-After`` header (RFC 9110 section 10.2.3), at least 1."""
    return str(max(1, math.ceil(seconds)))
