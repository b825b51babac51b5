"""``/_gateway/admin/...`` (admin scope): the running routes and upstreams, breakers held open
or closed by hand, bulkhead occupancy, and reloads of the route file without a restart."""
from __future__ import annotations

import hashlib
import os
import time
from datetime import UTC, datetime

import pybreaker
from flask import Blueprint, current_app
from werkzeug.exceptions import NotFound

from app.api import schemas
from app.api.common import Reply, operation, reply
from app.auth.views import policy
from app.errors import ProblemError
from app.gateway.control import CLOSED, OPEN, StoreUnavailable
from app.gateway.pipeline import UpstreamRuntime
from app.gateway.routefile import RouteFileError
from app.gateway.runtime import Gateway, request_gateway, served_routes
from app.identity import ADMIN_SCOPE
from app.models.base import isoformat

bp = Blueprint("admin_gateway", __name__)

ADMIN = (ADMIN_SCOPE,)


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


def _control():
    return current_app.extensions["gateway_control"]


def _timestamp(epoch: float | None) -> str | None:
    return isoformat(datetime.fromtimestamp(epoch, UTC)) if epoch is not None else None


def _route_file(gateway: Gateway) -> dict:
    return {
        "path": str(current_app.config["CONFIG"]),
        "digest": gateway.digest,
        "loaded_at": _timestamp(gateway.loaded_at),
        "routes": len(gateway.route_file.routes),
        "upstreams": len(gateway.route_file.upstreams),
    }


def _target(upstream: UpstreamRuntime, index: int, url: str) -> dict:
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


def _upstream(gateway: Gateway, upstream: UpstreamRuntime) -> dict:
    config = upstream.config
    slots = upstream.slots
    routes = [
        route.label
        for route in gateway.route_file.routes
        if route.upstream == upstream.name or any(call.upstream == upstream.name for call in (route.aggregate or {}).values())
    ]
    return {
        "name": upstream.name,
        "targets": [_target(upstream, index, url) for index, url in enumerate(config.targets)],
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


def _process(gateway: Gateway) -> dict:
    return {"pid": os.getpid(), "breakers_shared": current_app.extensions["redis"] is not None}


def _find(gateway: Gateway, name: str, target: str | None = None) -> tuple[UpstreamRuntime, str | None]:
    """The upstream ``name`` and, when asked, its target by id or index; else 404."""
    upstream = gateway.upstreams.get(name)
    if upstream is None:
        raise NotFound(f"No upstream {name!r}")
    if target is None:
        return upstream, None
    for index, url in enumerate(upstream.config.targets):
        if target in (target_id(url), str(index)):
            return upstream, url
    raise NotFound(f"Upstream {name!r} has no target {target!r} (give its id or index, as GET .../upstreams lists them)")


@bp.get("/admin/routes")
@policy("required", ADMIN)
@operation("List the running routes", {200: Reply(schemas.GatewayRoutes, "The route file served and its routes, in file order")})
def list_routes() -> tuple:
    """The routes of the route file this process serves, in the file's order, with the
    file's digest (the same in every process once a reload has reached it)."""
    gateway = request_gateway()
    data = served_routes(gateway)
    return reply(schemas.GatewayRoutes, {"route_file": _route_file(gateway), "data": data})


@bp.get("/admin/upstreams")
@policy("required", ADMIN)
@operation("List the upstreams, their breakers and bulkheads", {200: Reply(schemas.GatewayUpstreams, "Every upstream, in file order")})
def list_upstreams() -> tuple:
    """Every upstream with its targets, each target's breaker (state, failures, opening time,
    seconds to the half-open probe, held open by an operator) and the bulkhead's occupancy.
    Bulkheads are per process, and so are breakers without Redis: ``process`` says which
    process answered."""
    gateway = request_gateway()
    data = [_upstream(gateway, upstream) for upstream in gateway.upstreams.values()]
    return reply(schemas.GatewayUpstreams, {"process": _process(gateway), "data": data})


@bp.get("/admin/upstreams/<name>")
@policy("required", ADMIN)
@operation("Show one upstream", {200: Reply(schemas.GatewayUpstream, "The upstream")}, errors=(404,))
def show_upstream(name: str) -> tuple:
    """One upstream, as in the list."""
    gateway = request_gateway()
    upstream, _ = _find(gateway, name)
    return reply(schemas.GatewayUpstream, _upstream(gateway, upstream))


@bp.post("/admin/upstreams/<name>/targets/<target>/breaker/open")
@policy("required", ADMIN)
@operation("Hold a target's breaker open", {200: Reply(schemas.GatewayTarget, "The target, its breaker as it is now")}, errors=(404,))
def open_breaker(name: str, target: str) -> tuple:
    """Hold the target's breaker open in every process until it is closed through this API:
    requests go to the upstream's other targets, or answer 503 ``breaker-open`` when none is
    left. ``target`` is the target's ``id`` (or its index) from ``GET .../upstreams``. Every
    process applies it within CONTROL_SYNC_INTERVAL seconds. An action without a body, as
    Kong's ``POST .../targets/{target}/unhealthy``."""
    return _set_breaker(name, target, OPEN)


@bp.post("/admin/upstreams/<name>/targets/<target>/breaker/close")
@policy("required", ADMIN)
@operation("Close a target's breaker", {200: Reply(schemas.GatewayTarget, "The target, its breaker as it is now")}, errors=(404,))
def close_breaker(name: str, target: str) -> tuple:
    """Close the target's breaker in every process, its failures reset, as a recovery would:
    ends a hold, and closes a breaker that tripped by itself. ``target`` is the target's ``id``
    (or its index). Every process applies it within CONTROL_SYNC_INTERVAL seconds."""
    return _set_breaker(name, target, CLOSED)


def _set_breaker(name: str, target: str, state: str) -> tuple:
    gateway = request_gateway()
    upstream, url = _find(gateway, name, target)
    assert url is not None
    try:
        _control().set_breaker(upstream.name, url, state)
    except StoreUnavailable as exc:
        raise ControlUnavailable(f"The breaker was not changed: {exc}", headers={"Retry-After": "1"}) from exc
    return reply(schemas.GatewayTarget, _target(upstream, upstream.config.targets.index(url), url))


@bp.post("/admin/reload")
@policy("required", ADMIN)
@operation(
    "Reload the route file",
    {200: Reply(schemas.Reloaded, "The route file now served by every process")},
    errors=(422,),
)
def reload() -> tuple:
    """Read GATEWAY_CONFIG again, validate it and serve it, without a restart: in this
    process at once, in every other process (each gunicorn worker, each dyno on the same
    Redis or database) within CONTROL_SYNC_INTERVAL seconds. Requests in flight finish on
    the config they started with. An invalid file is a 422 ``invalid-route-file`` naming
    the file, the key and its line, and nothing changes anywhere."""
    try:
        gateway, changed = _control().reload()
    except RouteFileError as exc:
        raise InvalidRouteFile(str(exc), errors=[]) from exc
    except StoreUnavailable as exc:
        raise ControlUnavailable(f"The route file was not reloaded: {exc}", headers={"Retry-After": "1"}) from exc
    return reply(schemas.Reloaded, {**_route_file(gateway), "changed": changed})
