"""Async jobs: wiring them into the app.

Their settings are in ``app.jobs.settings``; submitting and cancelling in ``app.jobs.service``;
the job resource (JSON, URLs, finding a job for its owner) in ``app.jobs.resource``; waiting
for a job to end in ``app.jobs.waiting``; the worker's side (claim, run, sweep) in
``app.jobs.worker``.
"""
from __future__ import annotations

import logging
from functools import partial

from flask import Flask

log = logging.getLogger("frontdoor.jobs")


def init_app(app: Flask) -> None:
    """Read the JOB_* settings, register the async routes' submit handler and the waiter for
    job ends; warn about upstreams whose job calls could outlast the soft time limit (every
    attempt waiting its full ``job_timeout``), since such a job would fail with ``job-timeout``
    rather than with the upstream's own timeout."""
    from app.jobs import waiting
    from app.jobs.service import accept
    from app.jobs.settings import JobSettings

    app.extensions["jobs"] = config = JobSettings.from_config(app.config)
    app.extensions["job_submit"] = partial(accept, app)
    waiting.init_app(app)
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
