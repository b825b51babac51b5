"""Webhook endpoints: registering, changing, disabling and deleting one, its signing secrets
and their rotation, and its JSON resource (never the secret)."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete as delete_rows
from sqlalchemy import select, update

from app.extensions import db
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from app.models.base import isoformat, utcnow
from app.webhooks import secrets
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
    """Change the fields given (None: unchanged; ``url`` already checked by the SSRF guard) and
    commit. Enabling clears the failure record (``set_disabled``)."""
    if url is not None:
        endpoint.url = url
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
