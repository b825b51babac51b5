"""Managing consumers and keys: the domain calls behind the CLI, the /_gateway API and the portal.

The ``*_as`` calls apply what a caller may do with keys (its own only, unless it holds the
admin scope; never a scope it lacks), so every surface refuses the same things."""
from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from flask import current_app
from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError

from app.auth import keys
from app.auth.authenticate import InsufficientScope
from app.extensions import db
from app.identity import Principal
from app.models import ApiKey, Consumer
from app.models.base import isoformat, utcnow

# Names travel in X-Consumer-Username to upstreams and in log lines: visible ASCII only.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$")
SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._/-]{0,99}$")


class Conflict(Exception):
    """The change contradicts what is stored (a taken name, a revoked key)."""


class Invalid(ValueError):
    """A value is not acceptable; the message names it, ``field`` the input it came from."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise Invalid(f"name {name!r} must be 1-200 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    return name


def check_scopes(scopes: list[str]) -> list[str]:
    for scope in scopes:
        if not SCOPE.fullmatch(scope):
            raise Invalid(f"scope {scope!r} must be letters, digits and ':._/-', starting with a letter or digit")
    return sorted(set(scopes))


def check_plan(plan: str | None) -> str | None:
    """A plan must be one of RATELIMIT_PLANS when any are configured (None: the default limit)."""
    plans = current_app.config["RATELIMIT_PLANS"]
    if plan is not None and plans and plan not in plans:
        raise Invalid(f"plan {plan!r} is not configured; known plans: {', '.join(sorted(plans))}")
    return plan


def create_consumer(name: str, plan: str | None = None) -> Consumer:
    """Store a new consumer; raises Invalid or Conflict (the name is taken)."""
    consumer = Consumer(name=check_name(name), plan=check_plan(plan), disabled=False, created_at=utcnow())
    db.session.add(consumer)
    try:
        db.session.commit()
    except IntegrityError as exc:
        db.session.rollback()
        raise Conflict(f"a consumer named {name!r} already exists") from exc
    return consumer


def update_consumer(consumer: Consumer, plan: str | None = None, disabled: bool | None = None, set_plan: bool = False) -> Consumer:
    """Change a consumer's plan or disabled flag. Other processes see it within AUTH_CACHE_TTL."""
    if set_plan:
        consumer.plan = check_plan(plan)
    if disabled is not None:
        consumer.disabled = disabled
    db.session.commit()
    current_app.extensions["auth"].lookups.forget()  # this process at once
    return consumer


def find_consumer(reference: str) -> Consumer | None:
    """The consumer whose id or name is ``reference``."""
    return db.session.execute(
        select(Consumer).where((Consumer.id == reference) | (Consumer.name == reference))
    ).scalar()


def create_key(
    consumer: Consumer, scopes: list[str], expires_in: float | None = None, rotated_from: str | None = None,
    expires_at: datetime | None = None, latest_expiry: datetime | None = None,
) -> keys.MintedKey:
    """Mint and store a key; ``expires_in`` is seconds from now, ``latest_expiry`` a cap on the
    expiry (the creating credential's). Returns the row and the key."""
    if expires_in is not None:
        expires_at = utcnow() + timedelta(seconds=expires_in)
    if latest_expiry is not None and (expires_at is None or latest_expiry < expires_at):
        expires_at = latest_expiry
    minted = keys.mint(consumer, check_scopes(scopes), expires_at, rotated_from)
    db.session.add(minted.row)
    db.session.commit()
    return minted


def revoke_key(key: ApiKey) -> ApiKey:
    """Revoke ``key`` (idempotent). Every process refuses it within AUTH_CACHE_TTL seconds."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.session.commit()
    current_app.extensions["auth"].lookups.forget("key:" + key.secret_hash)
    return key


def rotate_key(key: ApiKey, expire_old_in: float | None = None, latest_expiry: datetime | None = None) -> keys.MintedKey:
    """A new key with the same consumer and scopes. The old key stays valid until it is revoked,
    or for ``expire_old_in`` more seconds when given. Raises Conflict for a revoked key."""
    now = utcnow()
    if key.status(now) != "active":
        raise Conflict(f"key {key.id} is {key.status(now)}; only an active key can be rotated")
    minted = create_key(
        key.consumer, list(key.scopes), rotated_from=key.id, expires_at=key.expires_at, latest_expiry=latest_expiry
    )
    if expire_old_in is not None:
        old_expiry = now + timedelta(seconds=expire_old_in)
        if key.expires_at is None or old_expiry < key.expires_at:
            key.expires_at = old_expiry
            db.session.commit()
            current_app.extensions["auth"].lookups.forget("key:" + key.secret_hash)
    return minted


def keys_visible_to(principal: Principal, consumer_id: str | None = None) -> Select:
    """The keys ``principal`` may list: its consumer's; with the admin scope every consumer's,
    or ``consumer_id``'s alone when given."""
    query = select(ApiKey)
    if not principal.is_admin:
        return query.where(ApiKey.consumer_id == principal.consumer_id)
    return query.where(ApiKey.consumer_id == consumer_id) if consumer_id else query


def key_as(principal: Principal, key_id: str, change: bool = False) -> ApiKey | None:
    """The key ``key_id`` if ``principal`` may see it (its consumer's, or any with the admin
    scope), else None whether or not it exists. To ``change`` it (rotate, revoke), a caller
    without the admin scope must hold every scope the key has: raises InsufficientScope (403),
    so a weak key can neither mint a copy of a strong one nor revoke it."""
    key = db.session.get(ApiKey, key_id)
    if key is None or (not principal.is_admin and key.consumer_id != principal.consumer_id):
        return None
    beyond = set(key.scopes or ()) - principal.scopes
    if change and beyond and not principal.is_admin:
        raise InsufficientScope(
            f"The key holds scopes the caller lacks ({', '.join(sorted(beyond))}); only its holder or an admin may change it"
        )
    return key


def _expiry_cap(principal: Principal) -> datetime | None:
    """A key made by a caller without the admin scope ends no later than the credential it was
    made with: a leaked short-lived key or token cannot mint a permanent one."""
    if principal.is_admin or principal.expires_at is None:
        return None
    return datetime.fromtimestamp(principal.expires_at, UTC)


def create_key_as(principal: Principal, consumer: str | None, scopes: list[str], expires_in: float | None = None) -> keys.MintedKey:
    """Mint a key for ``consumer`` (an id or name; None: the caller's own) with ``scopes``,
    expiring in ``expires_in`` seconds (None: never, or with the caller's credential). Without
    the admin scope a caller makes keys for itself only (InsufficientScope, 403) with scopes it
    holds (Invalid, field ``scopes``); Invalid (field ``consumer``) for an unknown consumer."""
    if consumer not in (None, principal.consumer_id, principal.consumer_name) and not principal.is_admin:
        raise InsufficientScope("Only a caller with the admin scope may create keys for another consumer")
    row = find_consumer(consumer or principal.consumer_id)
    if row is None:
        raise Invalid(f"no consumer has the id or name {consumer!r}", field="consumer")
    beyond = set(scopes) - principal.scopes
    if beyond and not principal.is_admin:
        raise Invalid(f"cannot grant scopes the caller does not hold: {', '.join(sorted(beyond))}", field="scopes")
    try:
        return create_key(row, scopes, expires_in, latest_expiry=_expiry_cap(principal))
    except Invalid as exc:
        raise Invalid(str(exc), field="scopes") from exc


def rotate_key_as(principal: Principal, key: ApiKey, expire_old_in: float | None = None) -> keys.MintedKey:
    """``rotate_key`` by ``principal`` (the key found with ``key_as(..., change=True)``): the
    new key ends no later than the caller's credential, as ``create_key_as``'s do."""
    return rotate_key(key, expire_old_in, latest_expiry=_expiry_cap(principal))


def consumer_json(consumer: Consumer) -> dict:
    return {
        "id": consumer.id,
        "name": consumer.name,
        "plan": consumer.plan,
        "disabled": consumer.disabled,
        "created_at": isoformat(consumer.created_at),
    }


def key_json(key: ApiKey, secret: str | None = None) -> dict:
    """A key as the API shows it; ``secret`` (the key itself) only in the answer that created it."""
    body = {
        "id": key.id,
        "consumer": key.consumer_id,
        "prefix": key.prefix,
        "scopes": list(key.scopes or ()),
        "status": key.status(utcnow()),
        "created_at": isoformat(key.created_at),
        "expires_at": isoformat(key.expires_at),
        "revoked_at": isoformat(key.revoked_at),
        "last_used_at": isoformat(key.last_used_at),
        "rotated_from": key.rotated_from,
    }
    if secret is not None:
        body["key"] = secret
    return body
