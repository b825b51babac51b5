"""Prometheus metrics: what the other modules count, and ``/metrics`` to read them.

Label values are bounded: routes are route-file labels or the gateway's own URL rules (never
raw paths), upstreams and targets come from the route file, outcomes are fixed words.

Under gunicorn with several workers, and in Celery's prefork pool, each process writes its
values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode) and
``/metrics`` sums them: ``gunicorn.conf.py`` and ``tasks/celery.py`` set that up. A Celery
worker serves its processes' sum on a port of its own (``app.observability.tasks``).
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

from flask import Blueprint, Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from app.auth.views import policy

# Seconds. Requests: from a cache hit (well under a millisecond) to Heroku's 30 s router limit.
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds. Waits measured in a queue: a job's or a webhook's, from at once to the retry schedule's hours.
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0, 36000.0)

REQUESTS = Counter(
    "frontdoor_http_requests_total",
    "Requests answered, by route (the route file's label, the gateway's own URL rule, or"
    " 'unmatched'), method and status code",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "frontdoor_http_request_duration_seconds",
    "Time from a request's arrival until its whole body was sent, by route",
    ["route"],
    buckets=REQUEST_BUCKETS,
)
UPSTREAM_SECONDS = Histogram(
    "frontdoor_upstream_duration_seconds",
    "Time spent waiting for an upstream's response headers (all attempts of one request), by route",
    ["route"],
    buckets=REQUEST_BUCKETS,
)
CACHE_RESPONSES = Counter(
    "frontdoor_cache_responses_total",
    "Answers on routes with a cache, by route and result: hit, miss (went upstream) or stale"
    " (served by stale-if-error)",
    ["route", "result"],
)
BREAKER_STATE = Gauge(
    "frontdoor_breaker_state",
    "Circuit breaker state per upstream target as this process last saw it change:"
    " 0 closed, 1 half-open, 2 open",
    ["upstream", "target"],
    multiprocess_mode="mostrecent",
)
BREAKER_TRANSITIONS = Counter(
    "frontdoor_breaker_transitions_total",
    "Circuit breaker state changes per upstream target, by the state entered",
    ["upstream", "target", "state"],
)
BULKHEAD_REJECTED = Counter(
    "frontdoor_bulkhead_rejected_total",
    "Requests answered 503 because an upstream's bulkhead (max_concurrency) was full",
    ["upstream"],
)
RATELIMIT_STORAGE_UNAVAILABLE = Counter(
    "frontdoor_ratelimit_storage_unavailable_total",
    "Requests that could not be rate limited because the limit storage was unreachable,"
    " by outcome: allowed (failed open) or refused (failed closed)",
    ["outcome"],
)
RATELIMIT_REJECTED = Counter(
    "frontdoor_ratelimit_rejected_total",
    "Requests answered 429 because a rate limit was exhausted, by route",
    ["route"],
)
JOBS = Counter(
    "frontdoor_jobs_total",
    "Jobs that reached a final status: succeeded, failed or canceled",
    ["status"],
)
JOB_QUEUE_SECONDS = Histogram(
    "frontdoor_job_queue_wait_seconds",
    "Time from a job's submission until a worker started it",
    buckets=WAIT_BUCKETS,
)
WEBHOOK_ATTEMPTS = Counter(
    "frontdoor_webhook_attempts_total",
    "Webhook delivery attempts, by outcome: succeeded (2xx), failed (any other answer or none)",
    ["outcome"],
)
WEBHOOK_LAG_SECONDS = Histogram(
    "frontdoor_webhook_delivery_lag_seconds",
    "Time from a delivery's creation (its message fanned out to the endpoint) until the"
    " endpoint acknowledged it (2xx); test sends are not counted",
    buckets=WAIT_BUCKETS,
)
TASKS = Counter(
    "frontdoor_celery_tasks_total",
    "Celery tasks run, by task name and outcome: succeeded, failed or retried",
    ["task", "outcome"],
)

BREAKER_STATES = {"closed": 0, "half-open": 1, "open": 2}

# Updates made for every request go through ``_later`` when a web worker has started the
# updater thread: a metric update takes prometheus-client's lock (in multiprocess mode one lock
# for every metric of the process), and in eight request threads that lock convoys under the
# GIL: 45 us of CPU per request for two updates, against 7 us from one thread (bench/README.md).
_later: queue.SimpleQueue | None = None
_updater: threading.Thread | None = None
_STOP = object()
# Seconds between a background thread's looks at its queue (this updater's, the log writer's).
BACKGROUND_INTERVAL = 0.05


# The labelled children updates are applied to, by metric and label values: ``labels()``
# checks and looks them up under the metric's lock on every call.
_children: dict[tuple, object] = {}


def _apply(metric, labels: tuple, method: str, value: float) -> None:
    if labels:
        child = _children.get((metric, labels))
        if child is None:
            child = _children[metric, labels] = metric.labels(*labels)
    else:
        child = metric
    getattr(child, method)(value)


def _apply_all(sums: dict[tuple, float]) -> None:
    for (metric, labels), total in sums.items():
        _apply(metric, labels, "inc", total)


def _update(metric, labels: tuple, method: str, value: float) -> None:
    later = _later
    if later is None:
        _apply(metric, labels, method, value)
    else:
        later.put((metric, labels, method, value))


def request_done(
    route: str | None, method: str, status: int, seconds: float | None, upstream_seconds: float | None, cache_status: str | None
) -> None:
    """Count one answered request. ``route`` None counts as 'unmatched'; ``seconds`` None (a
    request refused before its clock started) is counted but not timed; ``upstream_seconds``
    None means no upstream was called; ``cache_status`` is the response's Cache-Status field
    (RFC 9211), whose gateway member tells a hit, a miss and a stale answer apart."""
    label = route or "unmatched"
    _update(REQUESTS, (label, method, str(status)), "inc", 1)
    if seconds is not None:
        _update(REQUEST_SECONDS, (label,), "observe", seconds)
    if upstream_seconds is not None:
        _update(UPSTREAM_SECONDS, (label,), "observe", upstream_seconds)
    result = cache_result(cache_status)
    if result:
        _update(CACHE_RESPONSES, (label, result), "inc", 1)


def cache_result(cache_status: str | None) -> str:
    """'hit', 'miss', 'stale' or '' from a Cache-Status field: its last member, the gateway's."""
    if not cache_status or "frontdoor;" not in cache_status:
        return ""
    ours = cache_status.rsplit("frontdoor;", 1)[1]
    if "fwd=stale" in ours:
        return "stale"
    if " hit" in ours or ours.startswith("hit"):
        return "hit"
    return "miss" if "fwd=" in ours else ""


def update_in_background() -> None:
    """Apply the per-request updates in a thread of their own (the web workers: gunicorn.conf.py)."""
    global _later, _updater
    if _updater is not None:
        return
    later: queue.SimpleQueue = queue.SimpleQueue()

    def run() -> None:
        # What has queued up is applied together, a counter's increments summed into one
        # (under load each update is a write to the process's metrics file). The thread looks
        # every BACKGROUND_INTERVAL rather than waking for each update: a wake-up per request
        # (a context switch and a hand-over of the GIL) cost more than the update itself.
        while True:
            time.sleep(BACKGROUND_INTERVAL)
            batch = []
            with contextlib.suppress(queue.Empty):
                while True:
                    batch.append(later.get_nowait())
            sums: dict[tuple, float] = {}
            for item in batch:
                if item is _STOP:
                    _apply_all(sums)
                    return
                metric, labels, method, value = item
                if method == "inc":
                    sums[metric, labels] = sums.get((metric, labels), 0.0) + value
                else:
                    _apply(metric, labels, method, value)
            _apply_all(sums)

    _updater = threading.Thread(target=run, name="metrics-updater", daemon=True)
    _updater.start()
    _later = later


def stop_background() -> None:
    """Apply what is queued, then update in the calling thread again."""
    global _later, _updater
    later, updater = _later, _updater
    if later is None or updater is None:
        return
    _later = _updater = None
    later.put(_STOP)
    updater.join()


def registry() -> CollectorRegistry:
    """The registry to read: every process's values in multiprocess mode, else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        collected = CollectorRegistry()
        multiprocess.MultiProcessCollector(collected)
        return collected
    return REGISTRY


bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@policy("none")
def metrics() -> Response:
    """The Prometheus text format (version 0.0.4)."""
    return Response(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
