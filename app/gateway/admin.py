"""What an operator asks of the running gateway: the route file served, each upstream's targets
with their breakers and bulkhead, breakers held open or closed, reloads and cache purges.

The admin API (``app.api.admin_gateway``, ``app.api.admin_cache``) and the operator's portal
pages call these; each takes the app whose gateway it reads or changes.
"""
from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime

import pybreaker
from flask import Flask
from werkzeug.exceptions import NotFound

from app.errors import BadRequest, ProblemError
from app.gateway.cache import glob_escape
from app.gateway.control import CLOSED, OPEN, StoreUnavailable
from app.gateway.pipeline import UpstreamRuntime
from app.gateway.routefile import RouteFileError
from app.gateway.runtime import Gateway
from app.models.base import isoformat

BREAKER_STATES = (OPEN, CLOSED)
PURGE_BY = ("key", "route", "prefix")


class InvalidRouteFile(ProblemError):
    """422: the route file does not validate; the running config stays as it is everywhere."""

    status, title, slug = 422, "Invalid Route File", "invalid-route-file"


class ControlUnavailable(ProblemError):
    """503: the shared record other processes learn of changes from cannot be written."""

    status, title, slug = 503, "Service Unavailable", "control-unavailable"


def target_id(url: str) -> str:
    """A target's id in URLs: the first 12 hex digits of SHA-256 of its URL, so it neither
    carries slashes nor changes when a reload reorders the targets."""
    return hashlib.sha256(url.encode()).hexdigest()[:12]


def _timestamp(epoch: float | None) -> str | None:
    return isoformat(datetime.fromtimestamp(epoch, UTC)) if epoch is not None else None


def route_file(app: Flask, gateway: Gateway) -> dict:
    """``{"path", "digest", "loaded_at", "routes", "upstreams"}``: the route file ``gateway``
    serves, its SHA-256 digest and when it was loaded (RFC 3339)."""
    return {
        "path": str(app.config["CONFIG"]),
        "digest": gateway.digest,
        "loaded_at": _timestamp(gateway.loaded_at),
        "routes": len(gateway.route_file.routes),
        "upstreams": len(gateway.route_file.upstreams),
    }


def target(upstream: UpstreamRuntime, index: int, url: str) -> dict:
    """One target: ``{"id", "index", "url", "breaker": {"state", "held_open", "failures",
    "opened_at", "retry_in"}}``; ``retry_in`` is seconds to the half-open probe."""
    breakers = upstream.breakers
    reading = breakers.describe(url)
    retry_in = None
    if reading.state == pybreaker.STATE_OPEN and not reading.forced and reading.opened_at is not None:
        retry_in = round(max(reading.opened_at + breakers.config.reset_timeout - time.time(), 0.0), 3)
    return {
        "id": target_id(url),
        "index": index,
        "url": url,
        "breaker": {
            "state": reading.state,
            "held_open": reading.forced,
            "failures": reading.failures,
            "opened_at": _timestamp(reading.opened_at) if reading.state != pybreaker.STATE_CLOSED else None,  # pybreaker keeps the last one
            "retry_in": retry_in,
        },
    }


def upstream(gateway: Gateway, runtime: UpstreamRuntime) -> dict:
    """One upstream: its targets (``target``), the bulkhead's occupancy in this process, its
    breaker, timeout (seconds) and retry settings, and the routes that use it."""
    config = runtime.config
    slots = runtime.slots
    routes = [
        route.label
        for route in gateway.route_file.routes
        if route.upstream == runtime.name or any(call.upstream == runtime.name for call in (route.aggregate or {}).values())
    ]
    return {
        "name": runtime.name,
        "targets": [target(runtime, index, url) for index, url in enumerate(config.targets)],
        "bulkhead": {"in_flight": slots.in_flight, "max_concurrency": slots.max_concurrency} if slots else None,
        "breaker": {
            "fail_max": config.breaker.fail_max,
            "reset_timeout": config.breaker.reset_timeout,
            "failure_statuses": list(config.breaker.failure_statuses),
        },
        "timeout": {"connect": config.timeout.connect, "read": config.timeout.read},
        "retries": config.retries.attempts,
        "routes": routes,
    }


def process(app: Flask) -> dict:
    """``{"pid", "breakers_shared"}``: which process answered, and whether its breakers are
    shared through Redis (bulkheads are always per process)."""
    return {"pid": os.getpid(), "breakers_shared": app.extensions["redis"] is not None}


def find(gateway: Gateway, name: str, target_ref: str | None = None) -> tuple[UpstreamRuntime, str | None]:
    """The upstream ``name`` and, when asked, its target by id or index; raises NotFound (404)."""
    runtime = gateway.upstreams.get(name)
    if runtime is None:
        raise NotFound(f"No upstream {name!r}")
    if target_ref is None:
        return runtime, None
    for index, url in enumerate(runtime.config.targets):
        if target_ref in (target_id(url), str(index)):
            return runtime, url
    raise NotFound(f"Upstream {name!r} has no target {target_ref!r} (give its id or index, as GET .../upstreams lists them)")


def set_breaker(app: Flask, gateway: Gateway, name: str, target_ref: str, state: str) -> dict:
    """Hold the target's breaker open (``OPEN``) or close it (``CLOSED``) in every process,
    within CONTROL_SYNC_INTERVAL seconds; returns the target as ``target`` shows it. Raises
    NotFound (404) and ControlUnavailable (503, Retry-After) when the shared record cannot be
    written."""
    runtime, url = find(gateway, name, target_ref)
    assert url is not None
    try:
        app.extensions["gateway_control"].set_breaker(runtime.name, url, state)
    except StoreUnavailable as exc:
        raise ControlUnavailable(f"The breaker was not changed: {exc}", headers={"Retry-After": "1"}) from exc
    return target(runtime, runtime.config.targets.index(url), url)


def reload(app: Flask) -> dict:
    """Read GATEWAY_CONFIG again and serve it in every process; returns ``route_file`` with
    ``changed`` (bool). Raises InvalidRouteFile (422, nothing changes anywhere) and
    ControlUnavailable (503)."""
    try:
        gateway, changed = app.extensions["gateway_control"].reload()
    except RouteFileError as exc:
        raise InvalidRouteFile(str(exc), errors=[]) from exc
    except StoreUnavailable as exc:
        raise ControlUnavailable(f"The route file was not reloaded: {exc}", headers={"Retry-After": "1"}) from exc
    return {**route_file(app, gateway), "changed": changed}


def purge_cache(app: Flask, gateway: Gateway, key: str | None = None, route: str | None = None, prefix: str | None = None) -> int:
    """Delete cached responses, with exactly one of ``key`` (one URL, ``/path?a=1&b=2``: every
    consumer's and variant's entry, its parameters sorted as cached), ``route`` (its name or
    path) or ``prefix`` (every URL on or under a path). Returns the number of stored items
    removed (an entry and its Vary record count apart). Raises BadRequest (400)."""
    given = {name: value for name, value in (("key", key), ("route", route), ("prefix", prefix)) if value}
    if len(given) != 1:
        raise BadRequest("Give exactly one of key, route and prefix")
    (what, value), = given.items()
    namespace = f"{app.config['KEY_PREFIX']}:cache:"
    if what == "route":
        # A route's entries are keyed by its label (its name, else its path): find it by either.
        labels = {each.label for each in gateway.route_file.routes if value in (each.name, each.path)} or {value}
        # "label:" and, for routes chosen by match_headers, "label#<digest>:" (route_key).
        patterns = [f"{namespace}{glob_escape(label)}{tail}" for label in labels for tail in (":*", "#*")]
    else:
        if not value.startswith("/"):
            raise BadRequest(f"{what} must be a path starting with '/'")
        path, _, query = value.partition("?")
        if what == "key":
            wanted = f"{path}?{'&'.join(sorted(part for part in query.split('&') if part))}"
            patterns = [f"{namespace}*:GET:{glob_escape(wanted)}:*"]
        else:  # the path itself and what lies below it, on segment boundaries as routes match
            below = path.rstrip("/")
            patterns = [f"{namespace}*:GET:{glob_escape(below + '?')}*", f"{namespace}*:GET:{glob_escape(below)}/*"]
    store = gateway.settings.cache_store
    return sum(store.delete(pattern) for pattern in patterns)
