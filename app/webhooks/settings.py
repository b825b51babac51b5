"""The WEBHOOK_* settings (seconds and bytes), read once per app, and the secret box they open."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import current_app

from app.errors import ProblemError
from app.webhooks import secrets
from app.webhooks.guard import Guard, parse_networks

log = logging.getLogger("frontdoor.webhooks")


class SecretKeyUnset(ProblemError):
    """500: webhook endpoints need GATEWAY_WEBHOOK_SECRET_KEYS (the keys their signing secrets are encrypted with), and it is not set."""

    status, title, slug = 500, "Internal Server Error", "webhook-secret-key-unset"


@dataclass(frozen=True)
class Settings:
    """The WEBHOOK_* configuration, read once per app. Seconds and bytes."""

    timeout: float
    retry_schedule: tuple[float, ...]
    retry_jitter: float
    max_retry_after: float
    disable_after: float
    secret_overlap: float
    endpoint_concurrency: int
    batch_size: int
    fan_out_linger: float
    lease: float
    requeue_after: float
    dispatch_interval: float
    sweep_interval: float
    retention: float
    max_payload: int
    event_synchronous_commit: bool
    max_endpoints: int
    verify: bool | str
    guard: Guard

    @classmethod
    def from_config(cls, config: dict) -> Settings:
        schedule = config["WEBHOOK_RETRY_SCHEDULE"]
        if isinstance(schedule, str):
            schedule = [part for part in schedule.split(",") if part.strip()]
        networks = config["WEBHOOK_ALLOWED_NETWORKS"]
        if isinstance(networks, str):
            networks = [part for part in networks.split(",") if part.strip()]
        return cls(
            timeout=float(config["WEBHOOK_TIMEOUT"]),
            retry_schedule=tuple(max(0.0, float(delay)) for delay in schedule),
            retry_jitter=min(max(float(config["WEBHOOK_RETRY_JITTER"]), 0.0), 1.0),
            max_retry_after=float(config["WEBHOOK_MAX_RETRY_AFTER"]),
            disable_after=float(config["WEBHOOK_DISABLE_AFTER"]),
            secret_overlap=float(config["WEBHOOK_SECRET_OVERLAP"]),
            endpoint_concurrency=max(1, int(config["WEBHOOK_ENDPOINT_CONCURRENCY"])),
            batch_size=max(1, int(config["WEBHOOK_BATCH_SIZE"])),
            fan_out_linger=max(0.0, float(config["WEBHOOK_FAN_OUT_LINGER"])),
            lease=lease_for(config),
            requeue_after=float(config["WEBHOOK_REQUEUE_AFTER"]),
            dispatch_interval=float(config["WEBHOOK_DISPATCH_INTERVAL"]),
            sweep_interval=float(config["WEBHOOK_SWEEP_INTERVAL"]),
            retention=float(config["WEBHOOK_RETENTION"]),
            max_payload=int(config["WEBHOOK_MAX_PAYLOAD"]),
            event_synchronous_commit=bool(config["WEBHOOK_EVENT_SYNCHRONOUS_COMMIT"]),
            max_endpoints=int(config["WEBHOOK_MAX_ENDPOINTS"]),
            verify=config["WEBHOOK_CA_BUNDLE"] or bool(config["WEBHOOK_VERIFY_TLS"]),
            guard=Guard(allow_http=bool(config["WEBHOOK_ALLOW_HTTP"]), allowed=parse_networks(networks)),
        )

    @property
    def max_tries(self) -> int:
        """Attempts in one schedule: the first, then one per retry delay."""
        return 1 + len(self.retry_schedule)


# Beyond WEBHOOK_TIMEOUT (which bounds the HTTP exchange), what a batch's attempts may take in
# all: resolving hosts and the database work around the requests. Seconds.
ATTEMPT_MARGIN, KILL_MARGIN, LEASE_MARGIN = 3.0, 5.0, 6.0
# A deliver task keeps claiming batches while work is due, this long (seconds), then hands on
# with a new message: a backlog never holds one task for long, and fan-outs queued behind it wait little.
DRAIN = 1.0


def time_limits(config: dict) -> tuple[float, float]:
    """The deliver task's soft and hard time limits (seconds): DRAIN, then one more batch
    (WEBHOOK_TIMEOUT plus margins).

    A batch waits at most WEBHOOK_TIMEOUT + ATTEMPT_MARGIN for its attempts (one stuck outside
    the HTTP exchange, as in a hung DNS lookup, is recorded as failed); the limits are the net
    under that. A batch cut short by them leaves its leases to lapse: the dispatcher records
    those attempts as lost and schedules their next try.
    """
    timeout = float(config["WEBHOOK_TIMEOUT"])
    return DRAIN + timeout + ATTEMPT_MARGIN, DRAIN + timeout + KILL_MARGIN


def lease_for(config: dict) -> float:
    """WEBHOOK_LEASE, raised to WEBHOOK_TIMEOUT + 6 s when set shorter (seconds): a batch, from
    its claim to its record, takes at most WEBHOOK_TIMEOUT + ATTEMPT_MARGIN and the database work."""
    lease = float(config["WEBHOOK_LEASE"])
    floor = float(config["WEBHOOK_TIMEOUT"]) + LEASE_MARGIN
    if lease < floor:
        log.warning("WEBHOOK_LEASE (%g s) is shorter than an attempt may take; using %g s", lease, floor)
    return max(lease, floor)


def settings() -> Settings:
    return current_app.extensions["webhooks"]


def box() -> secrets.SecretBox:
    """The app's SecretBox; raises SecretKeyUnset (500) when WEBHOOK_SECRET_KEYS is needed and unset."""
    found = current_app.extensions["webhook_box"]
    if found is None:
        raise SecretKeyUnset(
            "GATEWAY_WEBHOOK_SECRET_KEYS is not set: webhook secrets are encrypted at rest with it, and every "
            "process on a shared database needs the same key (README: Configuration)"
        )
    return found
