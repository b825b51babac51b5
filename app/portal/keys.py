"""Portal pages for a consumer's API keys: the list, and creating, rotating and revoking one
(``manage.*_as``, as the API's ``/_gateway/keys``). A new key is shown once, on the answer to
the form that made it, and never again."""
from __future__ import annotations

from flask import redirect, request, url_for

from app.api.common import Unprocessable, found, page, validated
from app.api.keys import KeyCreate, KeyRotate
from app.auth import manage
from app.extensions import db
from app.models import ApiKey
from app.models.base import utcnow
from app.portal.forms import number, words
from app.portal.web import page as portal_page
from app.portal.web import render


def _listing(session, status: int = 200, **context):
    rows, next_cursor = page(manage.keys_visible_to(session.principal, session.principal.consumer_id), ApiKey, db.session)
    keys = [manage.key_json(row) for row in rows]
    return render("keys.html", session, status, keys=keys, next_cursor=next_cursor, now=utcnow(), **context)


def _own(session, key_id: str, change: bool = False) -> ApiKey:
    return found(manage.key_as(session.principal, key_id, change), "key", key_id)


@portal_page("/keys")
def keys(session):
    """The consumer's keys, newest first: prefix, scopes, created, last used, expiry, status."""
    return _listing(session)


@portal_page("/keys", methods=("POST",))
def create_key(session):
    """Create a key with the scopes and lifetime given (seconds; empty: no expiry); the page
    shows it this once."""
    try:
        expires_in = number(request.form.get("expires_in"), "expires_in")
        data = validated(KeyCreate, {"scopes": words(request.form.get("scopes")), "expires_in": expires_in})
        minted = manage.create_key_as(session.principal, None, data.scopes, data.expires_in)
    except manage.Invalid as exc:
        return _listing(session, 422, errors=[{"field": exc.field or "scopes", "message": str(exc)}])
    except Unprocessable as exc:
        return _listing(session, 422, errors=exc.extra["errors"])
    return _listing(session, 201, new_key=manage.key_json(minted.row, minted.key))


@portal_page("/keys/<id:key_id>/rotate", methods=("POST",))
def rotate_key(session, key_id: str):
    """A new key with the same scopes (shown once); the old one stays valid until revoked, or
    for ``expire_old_in`` seconds."""
    key = _own(session, key_id, change=True)
    try:
        data = validated(KeyRotate, {"expire_old_in": number(request.form.get("expire_old_in"), "expire_old_in")})
        minted = manage.rotate_key_as(session.principal, key, data.expire_old_in)
    except manage.Conflict as exc:
        return _listing(session, 409, errors=[{"field": "key", "message": str(exc)}])
    except Unprocessable as exc:
        return _listing(session, 422, errors=exc.extra["errors"])
    return _listing(session, 201, new_key=manage.key_json(minted.row, minted.key))


@portal_page("/keys/<id:key_id>/revoke", methods=("POST",))
def revoke_key(session, key_id: str):
    """Revoke the key; every gateway process refuses it within AUTH_CACHE_TTL seconds. A
    session signed in with it ends with it."""
    manage.revoke_key(_own(session, key_id, change=True))
    return redirect(url_for("portal.keys"), 303)
