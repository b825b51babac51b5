"""Portal pages: sign in (an API key or a JWT on a form), sign out, and the overview: the
consumer's plan and what is left of each limit that applies to it now."""
from __future__ import annotations

from flask import current_app, redirect, request, url_for
from sqlalchemy import func, select

from app.auth import manage
from app.auth.authenticate import Unauthenticated
from app.extensions import db
from app.gateway.runtime import request_gateway
from app.models import ApiKey, Job, WebhookEndpoint
from app.models.base import utcnow
from app.portal import sessions
from app.portal.web import (
    check_form,
    clear_cookie,
    form_cookie,
    local_next,
    new_form_token,
    page,
    render,
    session_cookie,
    set_cookie,
)

FORM_TOKEN_AGE = 3600  # seconds the sign-in form's token lives


def _sign_in_page(status: int = 200, error: str | None = None):
    token = request.cookies.get(form_cookie()) or new_form_token()
    current = sessions.signed_in(request.cookies.get(session_cookie()))
    body, status = render("sign_in.html", current, status, form_token=token, error=error, next=local_next(request.values.get("next")))
    response = current_app.make_response((body, status))
    # Strict: the token's cookie is never sent along with another site's request.
    set_cookie(response, form_cookie(), token, FORM_TOKEN_AGE, same_site="Strict")
    return response


@page("/sign-in", signed_in=False)
def sign_in():
    """The sign-in form (signed in already: the form switches to another key or token)."""
    return _sign_in_page()


@page("/sign-in", methods=("POST",), signed_in=False)
def sign_in_post():
    """Sign in with ``credential`` (an API key or a JWT): a new session and its cookie, the
    browser's earlier session ended. A refused credential shows the form again (401)."""
    check_form(request.cookies.get(form_cookie()))
    credential = request.form.get("credential", "").strip()
    if not credential:
        return _sign_in_page(400, "Paste an API key or a token to sign in.")
    try:
        token, session = sessions.sign_in(credential, request.cookies.get(session_cookie()))
    except Unauthenticated:
        return _sign_in_page(401, "The gateway does not accept that key or token: it is unknown, revoked or expired.")
    response = redirect(local_next(request.form.get("next")), 303)
    lifetime = int((session.expires_at - utcnow()).total_seconds())
    set_cookie(response, session_cookie(), token, max(lifetime, 1))
    clear_cookie(response, form_cookie())
    return response


@page("/sign-out", methods=("POST",))
def sign_out(session):
    """End this browser's session and go to the sign-in page."""
    sessions.sign_out(request.cookies.get(session_cookie()))
    response = redirect(url_for("portal.sign_in"), 303)
    clear_cookie(response, session_cookie())
    return response


@page("/")
def overview(session):
    """The consumer's plan, the limits that apply and what is left of each now, and counts of
    its keys, endpoints and jobs."""
    principal = session.principal
    limits = current_app.extensions["ratelimit_proxy"].standing(principal, request_gateway().route_file.routes)
    consumer = manage.find_consumer(principal.consumer_id)

    def count(model, *where):
        return db.session.execute(select(func.count()).select_from(model).where(model.consumer_id == principal.consumer_id, *where)).scalar_one()

    counts = {
        "keys": count(ApiKey, ApiKey.revoked_at.is_(None)),
        "endpoints": count(WebhookEndpoint),
        "jobs": count(Job),
    }
    return render("overview.html", session, consumer=consumer, limits=limits, counts=counts)
