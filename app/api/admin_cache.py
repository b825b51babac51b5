"""``DELETE /_gateway/admin/cache``: purge cached responses by key, by route, or by path prefix (admin scope)."""
from __future__ import annotations

from flask import Blueprint, current_app, request

from app.api import schemas
from app.api.common import Param, Reply, operation, reply
from app.auth.views import policy
from app.gateway import admin
from app.identity import ADMIN_SCOPE

bp = Blueprint("admin_cache", __name__)


@bp.delete("/admin/cache")
@policy("required", (ADMIN_SCOPE,))
@operation(
    "Purge cached responses",
    {200: Reply(schemas.Purged, "What was removed")},
    errors=(400,),
    params=(
        Param("key", "query", {"type": "string"}, "One URL, ``/path?a=1&b=2``: every consumer's and variant's entry"),
        Param("route", "query", {"type": "string"}, "Every entry of a route, by its name or path"),
        Param("prefix", "query", {"type": "string"}, "Every URL on or under a path, ``/users``"),
    ),
)
def purge() -> tuple:
    """Purge with exactly one of ``?key=/path?a=1&b=2`` (one URL: every consumer's and every
    variant's entry; the query as cached, its parameters sorted), ``?route=<route name or
    path>``, or ``?prefix=/path`` (every URL under it). Answers ``{"deleted": n}``: the number
    of stored items removed (an entry and its Vary record count apart)."""
    gateway = current_app.extensions["gateway"]
    deleted = admin.purge_cache(current_app, gateway, **{name: request.args.get(name) for name in admin.PURGE_BY})
    return reply(schemas.Purged, {"deleted": deleted})
