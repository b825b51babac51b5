"""What the API and the CLI ask of deliveries: a test send, a redelivery, and the delivery and attempt JSON."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Select, func, select, update

from app.extensions import db
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookMessage
from app.models.base import isoformat, new_id, utcnow
from app.models.webhooks import FAILED, MANUAL, PENDING, SENDING, TEST
from app.webhooks import attempts, messages
from app.webhooks.settings import settings


class EndpointBusy(Exception):
    """The endpoint already has WEBHOOK_ENDPOINT_CONCURRENCY attempts in flight."""


class DeliveryBusy(Exception):
    """The delivery is being sent right now."""


class EndpointDisabled(Exception):
    """The delivery's endpoint is disabled; the message names it and why."""


def owned(consumer_id: str, delivery_id: str) -> WebhookDelivery | None:
    """The delivery ``delivery_id`` of ``consumer_id``, or None when unknown or another's."""
    row = db.session.get(WebhookDelivery, delivery_id)
    return row if row is not None and row.consumer_id == consumer_id else None


def of_endpoint(endpoint_id: str, event_type: str | None = None) -> Select:
    """The deliveries of ``endpoint_id`` (a query, for ``common.page`` and ``common.with_status``),
    only those of the message type ``event_type`` when given."""
    query = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if event_type:
        types = select(WebhookMessage.id).where(WebhookMessage.type == event_type)
        query = query.where(WebhookDelivery.message_id.in_(types))
    return query


def redeliver_own(delivery: WebhookDelivery) -> WebhookDelivery:
    """``redeliver`` as a consumer asks for it: raises EndpointDisabled when its endpoint is
    disabled (enable it first), DeliveryBusy while an attempt is in flight."""
    endpoint = db.session.get(WebhookEndpoint, delivery.endpoint_id)
    if endpoint is not None and endpoint.disabled:
        raise EndpointDisabled(f"Endpoint {endpoint.id} is disabled ({endpoint.disabled_reason}); enable it first")
    return redeliver(delivery)


def send_test(endpoint: WebhookEndpoint, request_id: str | None) -> WebhookAttempt | None:
    """Send a ``webhook.test`` message to ``endpoint`` now, in this process, and return the
    attempt (one try, never retried; disabled endpoints too, so a fix can be checked first).

    A test takes one of the endpoint's WEBHOOK_ENDPOINT_CONCURRENCY slots like any attempt:
    raises EndpointBusy when none is free, so tests cannot pile up in the web process.
    """
    config = settings()
    now = utcnow()
    # The endpoint's row first (a write: SQLite's write lock, Postgres's row lock), so that no
    # claim counts its free slots meanwhile.
    db.session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint.id).values(claimed_at=now))
    busy = db.session.execute(select(func.count()).where(attempts.in_flight(endpoint.id, now))).scalar_one()
    if busy >= config.endpoint_concurrency:
        db.session.rollback()
        raise EndpointBusy(endpoint.id)
    data = {"endpoint_id": endpoint.id, "message": "a test delivery from the gateway"}
    message = messages.new_message(endpoint.consumer_id, messages.TEST_EVENT, data, request_id=request_id, created_at=now, fanned_out_at=now)
    db.session.add(message)
    db.session.flush()
    delivery = WebhookDelivery(
        id=new_id("dlv"),
        message_id=message.id,
        endpoint_id=endpoint.id,
        consumer_id=endpoint.consumer_id,
        status=SENDING,
        trigger=TEST,
        attempts=1,
        tries=1,
        lease_expires_at=now + timedelta(seconds=config.lease),
        last_attempt_at=now,
        created_at=now,
    )
    db.session.add(delivery)
    work = attempts.Claim(
        delivery_id=delivery.id,
        endpoint_id=endpoint.id,
        number=1,
        tries=1,
        trigger=TEST,
        url=endpoint.url,
        created_at=now,
        message_id=message.id,
        request_id=request_id,
        body=messages.payload(message.type, message.created_at, data),
        keys=attempts.Keys(endpoint.secret_encrypted, endpoint.previous_secret_encrypted, endpoint.previous_secret_expires_at),
    )
    db.session.commit()
    recorded = attempts.record([work], attempts.send_batch([work]))
    if not recorded:
        return None
    return db.session.execute(select(WebhookAttempt).where(WebhookAttempt.delivery_id == work.delivery_id)).scalar_one()


def redeliver(delivery: WebhookDelivery) -> WebhookDelivery:
    """Send ``delivery`` again, with the same ``webhook-id``, starting its retry schedule over;
    to a disabled endpoint it fails at once, naming why. Raises DeliveryBusy while an attempt is
    in flight. Commits, then asks a worker to send it."""
    now = utcnow()
    disabled = db.session.execute(select(WebhookEndpoint.disabled_reason).where(WebhookEndpoint.id == delivery.endpoint_id, WebhookEndpoint.disabled.is_(True))).first()
    values = (
        {"status": FAILED, "finished_at": now, "next_attempt_at": None, "last_error": f"endpoint disabled: {disabled.disabled_reason}"[:500]}
        if disabled is not None
        else {"status": PENDING, "finished_at": None, "next_attempt_at": now}
    )
    done = db.session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery.id, WebhookDelivery.status != SENDING).values(trigger=MANUAL, tries=0, **values)
    ).rowcount
    if not done:
        db.session.rollback()
        raise DeliveryBusy(delivery.id)
    db.session.commit()
    if disabled is None:
        attempts.wake([delivery.id])
    db.session.refresh(delivery)
    return delivery


def delivery_json(delivery: WebhookDelivery, message: WebhookMessage | None = None, attempts: list[WebhookAttempt] | None = None) -> dict:
    """A delivery with its message's id and type and, when given, its attempts (oldest first)."""
    data = {
        "id": delivery.id,
        "endpoint_id": delivery.endpoint_id,
        "message": messages.message_json(message) if message is not None else {"id": delivery.message_id},
        "status": delivery.status,
        "attempt_count": delivery.attempts,
        "next_attempt_at": isoformat(delivery.next_attempt_at),
        "last_attempt_at": isoformat(delivery.last_attempt_at),
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "created_at": isoformat(delivery.created_at),
        "finished_at": isoformat(delivery.finished_at),
    }
    if attempts is not None:
        data["attempts"] = [attempt_json(row) for row in attempts]
    return data


def attempt_json(row: WebhookAttempt) -> dict:
    """``{"id", "number", "trigger", "created_at", "duration_ms", "status_code", "succeeded",
    "response", "error", "url", "address", "request_id"}``; ``response`` is at most 4 KiB."""
    return {
        "id": row.id,
        "delivery_id": row.delivery_id,
        "number": row.number,
        "trigger": row.trigger,
        "created_at": isoformat(row.created_at),
        "duration_ms": row.duration_ms,
        "status_code": row.status_code,
        "succeeded": row.succeeded,
        "response": row.response_excerpt,
        "error": row.error,
        "url": row.url,
        "address": row.address,
        "request_id": row.request_id,
    }


ATTEMPTS_SHOWN = 20  # a delivery lists its latest attempts (``attempt_count`` counts them all)


def with_attempts(rows: list[WebhookDelivery]) -> list[dict]:
    """Deliveries as JSON (``delivery_json``) with their messages and latest ATTEMPTS_SHOWN attempts,
    read in two queries for them all."""
    ids = [row.id for row in rows]
    shown: dict[str, list] = {row_id: [] for row_id in ids}
    found = {}
    if ids:
        # The latest ATTEMPTS_SHOWN of each: redeliveries add attempts without end.
        ranked = (
            select(
                WebhookAttempt.id,
                func.row_number().over(partition_by=WebhookAttempt.delivery_id, order_by=WebhookAttempt.number.desc()).label("rank"),
            )
            .where(WebhookAttempt.delivery_id.in_(ids))
            .subquery()
        )
        latest = select(ranked.c.id).where(ranked.c.rank <= ATTEMPTS_SHOWN)
        for attempt in db.session.execute(
            select(WebhookAttempt).where(WebhookAttempt.id.in_(latest)).order_by(WebhookAttempt.number)
        ).scalars():
            shown[attempt.delivery_id].append(attempt)
        found = {
            message.id: message
            for message in db.session.execute(
                select(WebhookMessage).where(WebhookMessage.id.in_({row.message_id for row in rows}))
            ).scalars()
        }
    return [delivery_json(row, found.get(row.message_id), shown[row.id]) for row in rows]
