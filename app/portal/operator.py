"""The operator's portal pages (admin scope): the routes served with the route file's digest and
load time, reloading it, upstreams with each target's breaker and the bulkhead's occupancy,
holding a breaker open or closing it, purging cached responses, and consumers (plan, disabled).

The same services as the admin API (``app.gateway.admin``, ``app.auth.manage``)."""
from __future__ import annotations

from flask import current_app, redirect, request, url_for
from sqlalchemy import select
from werkzeug.exceptions import NotFound

from app.api.common import found, page
from app.auth import manage
from app.errors import ProblemError
from app.extensions import db
from app.gateway import admin
from app.gateway.control import CLOSED, OPEN
from app.gateway.runtime import request_gateway, served_routes
from app.models import Consumer
from app.portal.forms import checked
from app.portal.web import page as portal_page
from app.portal.web import render

BREAKER_ACTIONS = {"open": OPEN, "close": CLOSED}


def _routes_page(session, status: int = 200, **context):
    gateway = request_gateway()
    return render(
        "operator_routes.html", session, status, route_file=admin.route_file(current_app, gateway), routes=served_routes(gateway), **context
    )


@portal_page("/operator/routes", admin=True)
def routes_page(session):
    """The routes served by this process, in file order, with the file's digest and load time."""
    return _routes_page(session)


@portal_page("/operator/reload", methods=("POST",), admin=True)
def reload(session):
    """Reload the route file everywhere; an invalid file is shown (422) and nothing changes."""
    try:
        reloaded = admin.reload(current_app)
    except ProblemError as exc:
        return _routes_page(session, exc.status, error=exc.detail)
    return _routes_page(session, reloaded=reloaded)


def _upstreams_page(session, **context):
    gateway = request_gateway()
    listed = [admin.upstream(gateway, runtime) for runtime in gateway.upstreams.values()]
    return render("operator_upstreams.html", session, upstreams=listed, process=admin.process(current_app), **context)


@portal_page("/operator/upstreams", admin=True)
def upstreams_page(session):
    """Every upstream: each target's breaker (state, failures, held open) and the bulkhead."""
    return _upstreams_page(session)


@portal_page("/operator/upstreams/<name>/targets/<target>/breaker/<action>", methods=("POST",), admin=True)
def set_breaker(session, name: str, target: str, action: str):
    """Hold the target's breaker open, or close it, in every process. The answer is the page as
    this process sees it (the change applied), not a redirect another process might answer
    before CONTROL_SYNC_INTERVAL has brought it the change."""
    if action not in BREAKER_ACTIONS:
        raise NotFound(f"No breaker action {action!r}: open or close")
    changed = admin.set_breaker(current_app, request_gateway(), name, target, BREAKER_ACTIONS[action])
    return _upstreams_page(session, changed=changed, action=action, upstream_name=name)


@portal_page("/operator/cache", admin=True)
def cache_page(session):
    """The form to purge cached responses by URL, route or path prefix."""
    return render("operator_cache.html", session, routes=request_gateway().route_file.routes)


@portal_page("/operator/cache", methods=("POST",), admin=True)
def purge_cache(session):
    """Purge with one of ``key``, ``route`` or ``prefix``; the page says how many items went."""
    scope = request.form.get("by", "")
    value = request.form.get("value", "").strip()
    gateway = request_gateway()
    try:  # an unknown scope names none of them: purge_cache's 400
        deleted = admin.purge_cache(current_app, gateway, **({scope: value} if scope in admin.PURGE_BY else {}))
    except ProblemError as exc:
        return render("operator_cache.html", session, exc.status, routes=gateway.route_file.routes, error=exc.detail)
    return render("operator_cache.html", session, routes=gateway.route_file.routes, deleted=deleted, purged=f"{scope} {value}")


def _consumers_page(session, code: int = 200, **context):
    rows, next_cursor = page(select(Consumer), Consumer, db.session)
    plans = sorted(current_app.config["RATELIMIT_PLANS"])
    consumers = [manage.consumer_json(row) for row in rows]
    return render("operator_consumers.html", session, code, consumers=consumers, next_cursor=next_cursor, plans=plans, **context)


@portal_page("/operator/consumers", admin=True)
def consumers_page(session):
    """Every consumer, newest first, with its plan and state, and the forms to change them."""
    return _consumers_page(session)


@portal_page("/operator/consumers/<id:consumer_id>", methods=("POST",), admin=True)
def update_consumer(session, consumer_id: str):
    """Set the consumer's plan (empty: the default limit) and whether it is disabled."""
    consumer = found(db.session.get(Consumer, consumer_id), "consumer", consumer_id)
    plan = request.form.get("plan", "").strip() or None
    try:
        manage.update_consumer(consumer, plan, checked(request.form.get("disabled")), set_plan=True)
    except manage.Invalid as exc:
        db.session.rollback()
        return _consumers_page(session, 422, error=str(exc))
    return redirect(url_for("portal.consumers_page"), 303)
