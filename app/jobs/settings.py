"""The jobs' settings: the JOB_* configuration, read once per app."""
from __future__ import annotations

from dataclasses import dataclass

from flask import current_app


@dataclass(frozen=True)
class JobSettings:
    """The JOB_* configuration, read once per app. Seconds and bytes."""

    retry_after: int
    result_ttl: float
    retention: float
    max_result_size: int
    batch_max: int
    batch_concurrency: int
    soft_time_limit: float
    time_limit: float
    lease: float
    max_attempts: int
    requeue_after: float
    sweep_interval: float
    wait_max: float

    @classmethod
    def from_config(cls, config: dict) -> JobSettings:
        return cls(
            retry_after=max(1, int(config["JOB_RETRY_AFTER"])),
            result_ttl=float(config["JOB_RESULT_TTL"]),
            retention=float(config["JOB_RETENTION"]),
            max_result_size=int(config["JOB_MAX_RESULT_SIZE"]),
            batch_max=int(config["JOB_BATCH_MAX"]),
            batch_concurrency=max(1, int(config["JOB_BATCH_CONCURRENCY"])),
            soft_time_limit=float(config["JOB_SOFT_TIME_LIMIT"]),
            time_limit=float(config["JOB_TIME_LIMIT"]),
            lease=float(config["JOB_LEASE"]),
            max_attempts=max(1, int(config["JOB_MAX_ATTEMPTS"])),
            requeue_after=float(config["JOB_REQUEUE_AFTER"]),
            sweep_interval=float(config["JOB_SWEEP_INTERVAL"]),
            wait_max=max(0.0, float(config["JOB_WAIT_MAX"])),
        )


def settings() -> JobSettings:
    """The current app's JobSettings (``init_app`` reads them)."""
    return current_app.extensions["jobs"]
