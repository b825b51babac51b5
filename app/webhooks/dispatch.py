"""Beat's passes over the webhook tables: ``dispatch`` keeps deliveries moving, ``sweep`` deletes old ones."""
from __future__ import annotations

import math
from datetime import timedelta

from sqlalchemy import delete, func, select, update

from app.extensions import db, lock_rows
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookMessage
from app.models.base import utcnow
from app.models.webhooks import FAILED, PENDING, SENDING, SUCCEEDED
from app.webhooks import attempts, messages
from app.webhooks.sender import Result
from app.webhooks.settings import settings

# A pass sends at most this many deliver messages; each one's task keeps claiming batches while
# work is due, so a larger backlog needs no more of them, only time.
MAX_WAKES = 8


def dispatch(limit: int = 500) -> dict[str, int]:
    """Beat's pass (every WEBHOOK_DISPATCH_INTERVAL seconds); return counts by action.

    - publishes the jobs' outbox as messages;
    - fans out messages whose fan-out message was lost (older than WEBHOOK_REQUEUE_AFTER);
    - records attempts whose worker was lost (lease lapsed), which schedules their next try;
    - fails pending deliveries of disabled endpoints (one fanned out as its endpoint was disabled);
    - sends deliver messages for the deliveries due: one per WEBHOOK_BATCH_SIZE of them, at most
      MAX_WAKES (the workers claim the deliveries themselves, within each endpoint's cap).
    """
    config = settings()
    counts = {"published": messages.publish_job_events(limit), "fanned_out": 0, "lost": 0, "failed": 0, "due": 0, "woken": 0}
    now = utcnow()
    stale = list(
        db.session.execute(
            select(WebhookMessage.id)
            .where(WebhookMessage.fanned_out_at.is_(None), WebhookMessage.created_at <= now - timedelta(seconds=config.requeue_after))
            .limit(limit)
        ).scalars()
    )
    db.session.rollback()
    for message_id in stale:
        messages.fan_out(message_id)
        counts["fanned_out"] += 1

    lapsed = lock_rows(
        select(WebhookDelivery).where(WebhookDelivery.status == SENDING, WebhookDelivery.lease_expires_at < now).limit(limit)
    )
    urls = dict(
        db.session.execute(select(WebhookEndpoint.id, WebhookEndpoint.url).where(WebhookEndpoint.id.in_({row.endpoint_id for row in lapsed}))).all()
    ) if lapsed else {}
    works = [attempts.Claim(row.id, row.endpoint_id, row.attempts, row.tries, row.trigger, urls.get(row.endpoint_id, "")) for row in lapsed]
    db.session.rollback()
    counts["lost"] = len(attempts.record(works, [attempts.Sent(Result(None, 0, error=attempts.LOST))] * len(works)))

    counts["failed"] = db.session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.status == PENDING,
            WebhookDelivery.endpoint_id.in_(select(WebhookEndpoint.id).where(WebhookEndpoint.disabled.is_(True))),
        )
        .values(status=FAILED, finished_at=now, next_attempt_at=None, last_error="endpoint disabled")
    ).rowcount
    due = select(WebhookDelivery.id).where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= utcnow()).limit(config.batch_size * MAX_WAKES)
    counts["due"] = db.session.execute(select(func.count()).select_from(due.subquery())).scalar_one()
    db.session.commit()
    for _ in range(math.ceil(counts["due"] / config.batch_size)):
        counts["woken"] += attempts.wake()
    return counts


def sweep(limit: int = 1000) -> dict[str, int]:
    """Delete final deliveries (with their attempts) and messages older than WEBHOOK_RETENTION
    seconds; return counts. Messages go once no delivery of theirs is left."""
    config = settings()
    cutoff = utcnow() - timedelta(seconds=config.retention)
    old = list(
        db.session.execute(
            select(WebhookDelivery.id).where(WebhookDelivery.finished_at <= cutoff, WebhookDelivery.status.in_((SUCCEEDED, FAILED))).limit(limit)
        ).scalars()
    )
    if old:
        # The conditions again: a delivery redelivered since it was read is no longer old.
        still = select(WebhookDelivery.id).where(
            WebhookDelivery.id.in_(old), WebhookDelivery.finished_at <= cutoff, WebhookDelivery.status.in_((SUCCEEDED, FAILED))
        )
        db.session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(still)))
        db.session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(still)))
    gone = list(
        db.session.execute(
            select(WebhookMessage.id)
            .where(
                WebhookMessage.created_at <= cutoff,
                WebhookMessage.fanned_out_at.is_not(None),
                ~select(WebhookDelivery.id).where(WebhookDelivery.message_id == WebhookMessage.id).exists(),
            )
            .limit(limit)
        ).scalars()
    )
    if gone:
        db.session.execute(delete(WebhookMessage).where(WebhookMessage.id.in_(gone)))
    db.session.commit()
    return {"deliveries": len(old), "messages": len(gone)}
