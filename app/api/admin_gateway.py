"""``/_gateway/admin/...`` (admin scope): the running routes and upstreams, breakers held open
or closed by hand, bulkhead occupancy, and reloads of the route file without a restart."""
from __future__ import annotations

from flask import Blueprint, current_app

from app.api import schemas
from app.api.common import Reply, operation, reply
from app.auth.views import policy
from app.gateway import admin
from app.gateway.control import CLOSED, OPEN
from app.gateway.runtime import request_gateway, served_routes
from app.identity import ADMIN_SCOPE

bp = Blueprint("admin_gateway", __name__)

ADMIN = (ADMIN_SCOPE,)


@bp.get("/admin/routes")
@policy("required", ADMIN)
@operation("List the running routes", {200: Reply(schemas.GatewayRoutes, "The route file served and its routes, in file order")})
def list_routes() -> tuple:
    """The routes of the route file this process serves, in the file's order, with the
    file's digest (the same in every process once a reload has reached it)."""
    gateway = request_gateway()
    return reply(schemas.GatewayRoutes, {"route_file": admin.route_file(current_app, gateway), "data": served_routes(gateway)})


@bp.get("/admin/upstreams")
@policy("required", ADMIN)
@operation("List the upstreams, their breakers and bulkheads", {200: Reply(schemas.GatewayUpstreams, "Every upstream, in file order")})
def list_upstreams() -> tuple:
    """Every upstream with its targets, each target's breaker (state, failures, opening time,
    seconds to the half-open probe, held open by an operator) and the bulkhead's occupancy.
    Bulkheads are per process, and so are breakers without Redis: ``process`` says which
    process answered."""
    gateway = request_gateway()
    data = [admin.upstream(gateway, runtime) for runtime in gateway.upstreams.values()]
    return reply(schemas.GatewayUpstreams, {"process": admin.process(current_app), "data": data})


@bp.get("/admin/upstreams/<name>")
@policy("required", ADMIN)
@operation("Show one upstream", {200: Reply(schemas.GatewayUpstream, "The upstream")}, errors=(404,))
def show_upstream(name: str) -> tuple:
    """One upstream, as in the list."""
    gateway = request_gateway()
    runtime, _ = admin.find(gateway, name)
    return reply(schemas.GatewayUpstream, admin.upstream(gateway, runtime))


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
    return reply(schemas.GatewayTarget, admin.set_breaker(current_app, request_gateway(), name, target, state))


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
    return reply(schemas.Reloaded, admin.reload(current_app))
