"""Managing consumers and keys: the domain calls behind the CLI and the /_gateway API."""
from __future__ import annotations

import re
from datetime import datetime, timedelta

from flask import current_app
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.auth import keys
from app.extensions import db
from app.models import ApiKey, Consumer
from app.models.base import isoformat, utcnow

# Names travel in X-Consumer-Username to upstreams and in log lines: visible ASCII only.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,199}$")
SCOPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9:._/-]{0,99}$")


class Conflict(Exception):
    """The change contradicts what is stored (a taken name, a revoked key)."""


class Invalid(ValueError):
    """A value is not acceptable; the message names it."""


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
