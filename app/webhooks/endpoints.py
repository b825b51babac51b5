"""Webhook endpoints: registering, changing, disabling and deleting one, its signing secrets
and their rotation, and its JSON resource (never the secret). The API and the portal call these."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Select, func, select, update
from sqlalchemy import delete as delete_rows
from sqlalchemy.orm import undefer

from app.extensions import db
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.models.base import isoformat, utcnow
from app.webhooks import secrets
from app.webhooks.guard import UnsafeURL
from app.webhooks.settings import box, settings


def endpoint_json(endpoint: WebhookEndpoint) -> dict:
    """``{"id", "url", "description", "event_types", "disabled", "disabled_reason", ...}``:
    never the secret."""
    return {
        "id": endpoint.id,
        "url": endpoint.url,
        "description": endpoint.description,
        "event_types": list(endpoint.event_types or ()),
        "disabled": endpoint.disabled,
        "disabled_reason": endpoint.disabled_reason,
        "disabled_at": isoformat(endpoint.disabled_at),
        "failing_since": isoformat(endpoint.failing_since),
        "secret_rotating_until": isoformat(_rotating_until(endpoint)),
        "created_at": isoformat(endpoint.created_at),
        "updated_at": isoformat(endpoint.updated_at),
    }


def _rotating_until(endpoint: WebhookEndpoint, now: datetime | None = None) -> datetime | None:
    until = endpoint.previous_secret_expires_at
    return until if until is not None and until > (now or utcnow()) else None


class Refused(ValueError):
    """An endpoint's field is not acceptable: ``field`` names it, the message says why."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def owned(consumer_id: str, endpoint_id: str, secret: bool = False) -> WebhookEndpoint | None:
    """The endpoint ``endpoint_id`` of ``consumer_id`` (with its secrets loaded when
    ``secret``), or None when it is unknown or another consumer's."""
    options = [undefer(WebhookEndpoint.secret_encrypted), undefer(WebhookEndpoint.previous_secret_encrypted)] if secret else []
    endpoint = db.session.get(WebhookEndpoint, endpoint_id, options=options)
    return endpoint if endpoint is not None and endpoint.consumer_id == consumer_id else None


def of_consumer(consumer_id: str) -> Select:
    """The endpoints of ``consumer_id`` (a query, for ``common.page``)."""
    return select(WebhookEndpoint).where(WebhookEndpoint.consumer_id == consumer_id)


def checked_url(url: str) -> str:
    """``url`` when the SSRF guard lets it through now (https, every resolved address public
    or allow-listed); raises Refused (field ``url``) naming why not."""
    try:
        settings().guard.check(url)
    except UnsafeURL as exc:
        raise Refused("url", str(exc)) from None
    return url


def register(consumer_id: str, url: str, description: str, event_types: list[str], secret: str | None = None,
             disabled: bool = False) -> tuple[WebhookEndpoint, str]:
    """``create`` after the checks every surface makes: the URL passes the SSRF guard, and the
    consumer has fewer than WEBHOOK_MAX_ENDPOINTS endpoints. Raises Refused naming the field."""
    checked_url(url)
    limit = settings().max_endpoints
    count = db.session.execute(
        select(func.count()).select_from(WebhookEndpoint).where(WebhookEndpoint.consumer_id == consumer_id)
    ).scalar_one()
    if count >= limit:
        raise Refused("url", f"a consumer may have {limit} endpoints (WEBHOOK_MAX_ENDPOINTS); delete one first")
    return create(consumer_id, url, description, event_types, secret, disabled)


def secret_of(endpoint: WebhookEndpoint) -> str:
    """The plain secret deliveries are signed with now (the row read with ``secret=True``)."""
    return box().decrypt(endpoint.secret_encrypted)


def create(consumer_id: str, url: str, description: str, event_types: list[str], secret: str | None, disabled: bool) -> tuple[WebhookEndpoint, str]:
    """Write an endpoint (the URL already checked) and return it with its plain secret, the one
    generated when ``secret`` is None. Raises SecretKeyUnset."""
    plain = secret or secrets.generate()
    now = utcnow()
    endpoint = WebhookEndpoint(
        consumer_id=consumer_id,
        url=url,
        description=description,
        event_types=event_types,
        disabled=disabled,
        disabled_reason="disabled when registered" if disabled else None,
        disabled_at=now if disabled else None,
        secret_encrypted=box().encrypt(plain),
        created_at=now,
        updated_at=now,
    )
    db.session.add(endpoint)
    db.session.commit()
    return endpoint, plain


def signing_secrets(endpoint, now: datetime | None = None) -> list[str]:
    """The secrets of ``endpoint`` (a row with its three secret columns, or ``attempts.Keys``) to
    sign with, newest first: the previous one too while a rotation
    overlaps (WEBHOOK_SECRET_OVERLAP seconds). Raises SecretKeyUnset or SecretUnreadable."""
    found = [box().decrypt(endpoint.secret_encrypted)]
    if endpoint.previous_secret_encrypted is not None and _rotating_until(endpoint, now) is not None:
        found.append(box().decrypt(endpoint.previous_secret_encrypted))
    return found


def rotate_secret(endpoint: WebhookEndpoint, secret: str | None) -> str:
    """Make ``secret`` (or a generated one) the endpoint's secret; the old one keeps signing too
    for WEBHOOK_SECRET_OVERLAP seconds. Returns the new plain secret."""
    plain = secret or secrets.generate()
    now = utcnow()
    # Re-encrypted under the first key: a key rotation that passed this endpoint already
    # must not leave its previous secret under a key about to be removed.
    endpoint.previous_secret_encrypted = box().rotate(endpoint.secret_encrypted)
    endpoint.previous_secret_expires_at = now + timedelta(seconds=settings().secret_overlap)
    endpoint.secret_encrypted = box().encrypt(plain)
    endpoint.updated_at = now
    db.session.commit()
    return plain


def set_disabled(endpoint: WebhookEndpoint, disabled: bool, reason: str | None = None) -> None:
    """Disable or enable ``endpoint`` in the caller's transaction. Enabling clears the failure
    record, so the next failure starts a new WEBHOOK_DISABLE_AFTER period."""
    if disabled and not endpoint.disabled:
        endpoint.disabled, endpoint.disabled_reason, endpoint.disabled_at = True, reason, utcnow()
    elif not disabled and endpoint.disabled:
        endpoint.disabled, endpoint.disabled_reason, endpoint.disabled_at = False, None, None
        endpoint.failing_since = None


def change(endpoint: WebhookEndpoint, url: str | None = None, description: str | None = None,
           event_types: list[str] | None = None, disabled: bool | None = None) -> WebhookEndpoint:
    """Change the fields given (None: unchanged) and commit. A new ``url`` passes the SSRF guard
    first (Refused); enabling clears the failure record (``set_disabled``)."""
    if url is not None:
        endpoint.url = checked_url(url)
    if description is not None:
        endpoint.description = description
    if event_types is not None:
        endpoint.event_types = event_types
    if disabled is not None:
        set_disabled(endpoint, disabled, "disabled by its consumer")
    endpoint.updated_at = utcnow()
    db.session.commit()
    return endpoint


def delete(endpoint: WebhookEndpoint) -> None:
    """Delete ``endpoint`` with its deliveries and their attempts, and commit."""
    # The endpoint's row first, as a claim takes it: the same lock order, so no deadlock.
    db.session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id).values(updated_at=utcnow()))
    ids = select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint.id)
    db.session.execute(delete_rows(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids)))
    db.session.execute(delete_rows(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
    db.session.delete(endpoint)
    db.session.commit()
