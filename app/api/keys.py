"""``/_gateway/keys``: a consumer's own API keys; with the ``admin`` scope, every consumer's.

A key is shown once, in the 201 that creates it (``key``). Rotating gives a new key while the
old one stays valid until it is revoked (or for ``expire_old_in`` seconds). Another consumer's
key id answers 404, as an unknown one does.
"""
from __future__ import annotations

from typing import Annotated

from flask import Blueprint, request, url_for
from pydantic import Field

from app.api import schemas
from app.api.common import (
    PAGE,
    ConflictProblem,
    Param,
    Reply,
    Schema,
    body,
    found,
    invalid,
    operation,
    page,
    reply,
)
from app.api.idempotency import HEADER as IDEMPOTENCY_KEY
from app.api.idempotency import idempotent
from app.api.inputs import ConsumerReference, Scope
from app.auth import manage
from app.auth.views import current_principal
from app.extensions import db
from app.identity import Principal
from app.models import ApiKey

bp = Blueprint("keys", __name__)

# A hundred years: beyond it a lifetime is a typo, and datetime arithmetic overflows well
# before float does (a 500, found by schemathesis).
MAX_SECONDS = 100 * 365 * 86400


class KeyCreate(Schema):
    consumer: ConsumerReference | None = None  # id or name; only with the admin scope (default: the caller)
    scopes: list[Scope] = Field(default_factory=list)  # type: ignore[valid-type]
    expires_in: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = None  # seconds


class KeyRotate(Schema):
    expire_old_in: Annotated[float, Field(ge=0, le=MAX_SECONDS)] | None = None  # seconds; default: until revoked


def _caller() -> Principal:
    principal = current_principal()
    assert principal is not None  # these views require a credential (the default policy)
    return principal


def _own(key_id: str, change: bool = False) -> ApiKey:
    """The key ``key_id`` if the caller may see it; 404 otherwise, whether or not it exists
    (``manage.key_as``: 403 to ``change`` a key with scopes the caller lacks)."""
    return found(manage.key_as(_caller(), key_id, change), "key", key_id)


def _created(minted) -> tuple:
    location = url_for("keys.read", key_id=minted.row.id, _external=True)
    return reply(schemas.NewApiKey, manage.key_json(minted.row, minted.key), 201, {"Location": location})


CREATED = {201: Reply(schemas.NewApiKey, "The new key, with ``key`` shown this once", ("Location", "Idempotent-Replayed?"), location="keys.read")}


@bp.post("/keys")
@operation("Create an API key", CREATED, body=KeyCreate, errors=(403, 409), params=(IDEMPOTENCY_KEY,))
@idempotent(reveals_secret=True)
def create() -> tuple:
    """Create a key: ``{"scopes": [...], "expires_in": seconds, "consumer": id-or-name}``.

    Without the admin scope a caller creates keys for itself only, with scopes it holds.
    """
    data = body(KeyCreate)
    try:
        minted = manage.create_key_as(_caller(), data.consumer, data.scopes, data.expires_in)
    except manage.Invalid as exc:
        raise invalid(exc.field or "scopes", str(exc)) from exc
    return _created(minted)


@bp.get("/keys")
@operation(
    "List API keys",
    {200: Reply(schemas.Page[schemas.ApiKey], "One page of keys")},
    params=(*PAGE, Param("consumer", "query", {"type": "string"}, "With the admin scope: one consumer's keys (its id)")),
)
def index() -> tuple:
    """``{"data": [key, ...], "next_cursor": ...}``: the caller's keys, newest first; with the
    admin scope every consumer's, or one consumer's with ``?consumer=<id>``."""
    query = manage.keys_visible_to(_caller(), request.args.get("consumer"))
    rows, next_cursor = page(query, ApiKey, db.session)
    return reply(schemas.Page[schemas.ApiKey], {"data": [manage.key_json(row) for row in rows], "next_cursor": next_cursor})


@bp.get("/keys/<id:key_id>")
@operation("Read an API key", {200: Reply(schemas.ApiKey, "The key (never the key itself)")}, errors=(404,))
def read(key_id: str) -> tuple:
    return reply(schemas.ApiKey, manage.key_json(_own(key_id)))


@bp.delete("/keys/<id:key_id>")
@operation("Revoke an API key", {200: Reply(schemas.ApiKey, "The revoked key")}, errors=(403, 404))
def revoke(key_id: str) -> tuple:
    """Revoke the key (idempotent); every gateway process refuses it within AUTH_CACHE_TTL seconds.
    403 when the key holds scopes the caller lacks (and the caller is not an admin)."""
    return reply(schemas.ApiKey, manage.key_json(manage.revoke_key(_own(key_id, change=True))))


@bp.post("/keys/<id:key_id>/rotate")
@operation("Rotate an API key", CREATED, body=KeyRotate, errors=(403, 404, 409), params=(IDEMPOTENCY_KEY,))
@idempotent(reveals_secret=True)
def rotate(key_id: str) -> tuple:
    """A new key with the same consumer and scopes (201, shown once); the old one stays valid
    until revoked, or for ``expire_old_in`` seconds. 409 for a revoked or expired key."""
    key = _own(key_id, change=True)
    data = body(KeyRotate)
    try:
        minted = manage.rotate_key_as(_caller(), key, data.expire_old_in)
    except manage.Conflict as exc:
        raise ConflictProblem(str(exc)) from exc
    return _created(minted)
