"""Portal sign-in: sessions kept in the database behind a random cookie token, and the CSRF
token every form of a session carries (OWASP's synchronizer token pattern).

The cookie holds 32 random bytes; the database holds only their SHA-256, so a copy of the table
signs no one in. A session ends at PORTAL_SESSION_LIFETIME seconds (never after its credential
expires), at sign-out, and as soon as its key is revoked or expires or its consumer is disabled:
every request reads them again.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import current_app
from sqlalchemy import delete

from app.extensions import db
from app.identity import Principal
from app.models import ApiKey, Consumer, PortalSession
from app.models.base import utcnow

TOKEN_BYTES = 32


@dataclass(frozen=True)
class SignedIn:
    """A session as a request sees it: who (``principal``, its key's scopes as they are now),
    the token its forms must carry, and when it ends."""

    principal: Principal
    csrf_token: str
    expires_at: datetime


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def sign_in(credential: str, previous: str | None = None) -> tuple[str, SignedIn]:
    """Sign in with an API key or a JWT: a new session and the cookie token for it. The
    browser's ``previous`` session (its cookie token) ends, so a token planted before sign-in
    is worth nothing after it (session fixation, OWASP). Raises Unauthenticated (401) for a
    credential the gateway refuses, as the API does."""
    principal = current_app.extensions["auth"].identify(credential)
    now = utcnow()
    ended = [PortalSession.expires_at <= now]
    if previous:
        ended.append(PortalSession.id == _digest(previous))
    for condition in ended:
        db.session.execute(delete(PortalSession).where(condition))
    expires_at = now + timedelta(seconds=float(current_app.config["PORTAL_SESSION_LIFETIME"]))
    if principal.expires_at is not None:
        expires_at = min(expires_at, datetime.fromtimestamp(principal.expires_at, UTC))
    token = secrets.token_urlsafe(TOKEN_BYTES)
    row = PortalSession(
        id=_digest(token),
        consumer_id=principal.consumer_id,
        credential_id=principal.credential_id,
        scopes=sorted(principal.scopes),
        csrf_token=secrets.token_urlsafe(TOKEN_BYTES),
        created_at=now,
        expires_at=expires_at,
    )
    db.session.add(row)
    db.session.commit()
    return token, SignedIn(principal, row.csrf_token, expires_at)


def signed_in(token: str | None) -> SignedIn | None:
    """The session whose cookie token is ``token``, or None when there is none, it has ended,
    its consumer is disabled or its key is revoked or expired."""
    if not token or len(token) > 2 * TOKEN_BYTES:
        return None
    row = db.session.get(PortalSession, _digest(token))
    now = utcnow()
    if row is None or row.expires_at <= now:
        return None
    consumer = db.session.get(Consumer, row.consumer_id)
    if consumer is None or consumer.disabled:
        return None
    # The credential's own expiry, as the API would see it (a key made here ends no later);
    # a JWT's is not kept, so its session's end stands for it (it is never later).
    scopes, credential_expiry = row.scopes, row.expires_at.timestamp()
    if row.credential_id != "jwt":
        key = db.session.get(ApiKey, row.credential_id)
        if key is None or key.status(now) != "active":
            return None
        scopes = key.scopes or []
        credential_expiry = key.expires_at.timestamp() if key.expires_at is not None else None
    principal = Principal(
        consumer_id=consumer.id,
        consumer_name=consumer.name,
        plan=consumer.plan,
        scopes=frozenset(scopes),
        credential_id=row.credential_id,
        expires_at=credential_expiry,
    )
    return SignedIn(principal, row.csrf_token, row.expires_at)


def sign_out(token: str | None) -> None:
    """End the session of ``token`` (nothing when there is none)."""
    if token:
        db.session.execute(delete(PortalSession).where(PortalSession.id == _digest(token)))
        db.session.commit()


def same_token(given: str | None, expected: str) -> bool:
    """Whether a form's CSRF token is the session's (compared in constant time)."""
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
