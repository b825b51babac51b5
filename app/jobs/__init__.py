"""Async jobs: their settings, and wiring them into the app.

Submitting and cancelling are in ``app.jobs.service``, the job resource (JSON, URLs, finding a
job for its owner) in ``app.jobs.resource``, the worker's side (claim, run, sweep) in
``app.jobs.worker``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

from flask import Flask, current_app

log = logging.getLogger("frontdoor.jobs")


@dataclass(frozen=True)
class Settings:
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

    @classmethod
    def from_config(cls, config: dict) -> Settings:
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
        )


def settings() -> Settings:
    return current_app.extensions["jobs"]


def init_app(app: Flask) -> None:
    """Read the JOB_* settings; warn about upstreams whose job calls could outlast the soft
    time limit (every attempt waiting its full ``job_timeout``), since such a job would fail
    with ``job-timeout`` rather than with the upstream's own timeout."""
    app.extensions["jobs"] = config = Settings.from_config(app.config)
    from app.jobs.service import accept  # the services import this package's settings()

    app.extensions["job_submit"] = partial(accept, app)
    gateway = app.extensions.get("gateway")
    if gateway is None:
        return
    for name, upstream in gateway.route_file.upstreams.items():
        budget = (upstream.job_timeout.connect + upstream.job_timeout.read) * upstream.retries.attempts
        if budget > config.soft_time_limit:
            log.warning(
                "upstream %s: job_timeout x retries.attempts (%g s) exceeds JOB_SOFT_TIME_LIMIT (%g s)",
                name,
                budget,
                config.soft_time_limit,
            )
