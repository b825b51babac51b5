"""``DELETE /_gateway/admin/cache``: purge cached responses by key, by route, or by path prefix (admin scope)."""
from __future__ import annotations

from flask import Blueprint, current_app, request

from app.api import schemas
from app.api.common import BadRequest, Param, Reply, operation, reply
from app.auth.views import policy
from app.gateway.cache import glob_escape
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
    given = {name: request.args[name] for name in ("key", "route", "prefix") if request.args.get(name)}
    if len(given) != 1:
        raise BadRequest("Give exactly one of key, route and prefix")
    (what, value), = given.items()
    namespace = f"{current_app.config['KEY_PREFIX']}:cache:"
    gateway = current_app.extensions["gateway"]
    if what == "route":
        # A route's entries are keyed by its label (its name, else its path): find it by either.
        labels = {route.label for route in gateway.route_file.routes if value in (route.name, route.path)} or {value}
        # "label:" and, for routes chosen by match_headers, "label#<digest>:" (route_key).
        patterns = [f"{namespace}{glob_escape(label)}{tail}" for label in labels for tail in (":*", "#*")]
    else:
        if not value.startswith("/"):
            raise BadRequest(f"{what} must be a path starting with '/'")
        path, _, query = value.partition("?")
        if what == "key":
            target = f"{path}?{'&'.join(sorted(part for part in query.split('&') if part))}"
            patterns = [f"{namespace}*:GET:{glob_escape(target)}:*"]
        else:  # the path itself and what lies below it, on segment boundaries as routes match
            below = path.rstrip("/")
            patterns = [f"{namespace}*:GET:{glob_escape(below + '?')}*", f"{namespace}*:GET:{glob_escape(below)}/*"]
    store = gateway.settings.cache_store
    return reply(schemas.Purged, {"deleted": sum(store.delete(pattern) for pattern in patterns)})
