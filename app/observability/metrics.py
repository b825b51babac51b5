"""Prometheus metrics: the counters other modules increment, and ``/metrics`` to read them."""
from __future__ import annotations

import os

from flask import Blueprint, Flask, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)

from app.auth import policy

# Label values are bounded: outcomes are fixed words, routes are route-file labels, not paths.
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

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
@policy("none")
def metrics() -> Response:
    """The Prometheus text format (version 0.0.4). With ``PROMETHEUS_MULTIPROC_DIR`` set, the
    values of every process writing there (prometheus-client's multiprocess mode)."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
