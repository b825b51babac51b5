"""Delivering webhooks: claim a due delivery, sign and send it, record the attempt, schedule the next.

A delivery is claimed with one conditional UPDATE that also takes the attempt number (the
fencing token every later write is conditional on) and a lease; a worker that dies mid-attempt
leaves the lease to lapse, and the dispatcher records that attempt as lost and schedules the
next, so a delivery is never stranded. Retries are a due time on the row, picked up by the
dispatcher (beat), never a Celery countdown (DESIGN, "Worker rules").
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from celery.exceptions import SoftTimeLimitExceeded
from flask import current_app
from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import undefer

from app import queue, webhooks
from app.extensions import db, lock_rows
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookMessage
from app.models.base import isoformat, utcnow
from app.models.webhooks import (
    FAILED,
    MANUAL,
    PENDING,
    SCHEDULED,
    SENDING,
    SUCCEEDED,
    TEST,
)
from app.observability import metrics, tracing
from app.webhooks import endpoints, messages, secrets
from app.webhooks.guard import UnsafeURL
from app.webhooks.sender import Result, send

log = logging.getLogger("frontdoor.webhooks")

USER_AGENT = "Frontdoor-Webhooks/1.0"
# An attempt whose worker vanished: recorded like a network failure, then retried on schedule.
LOST = "the worker was lost during the attempt (its lease lapsed)"


@dataclass(frozen=True)
class Claim:
    """A delivery this worker holds: its attempt number (the fencing token) and what it sends."""

    delivery_id: str
    endpoint_id: str
    number: int
    tries: int
    trigger: str
    created_at: datetime | None = None  # the delivery's: its lag is counted from here


def _mine(claim: Claim):
    return and_(WebhookDelivery.id == claim.delivery_id, WebhookDelivery.status == SENDING, WebhookDelivery.attempts == claim.number)


def _lock_endpoint(endpoint_id: str, now: datetime) -> None:
    """Write the endpoint's row (``claimed_at``) as a transaction's first statement: it holds the
    row's lock (Postgres) or the write lock (SQLite) until commit."""
    db.session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).values(claimed_at=now))


def _in_flight(endpoint_id: str, now: datetime) -> int:
    """Attempts to the endpoint being made now (claimed, under a live lease)."""
    return db.session.execute(
        select(func.count())
        .select_from(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == SENDING, WebhookDelivery.lease_expires_at > now)
    ).scalar_one()


def claim(delivery_id: str, now: datetime | None = None) -> Claim | None:
    """Take the pending, due delivery ``delivery_id`` for one attempt; None when it is not
    pending or due, when its endpoint already has WEBHOOK_ENDPOINT_CONCURRENCY attempts in
    flight (it stays pending for the dispatcher), or when its endpoint is disabled (it fails).
    """
    config = webhooks.settings()
    now = now or utcnow()
    endpoint_id = db.session.execute(select(WebhookDelivery.endpoint_id).where(WebhookDelivery.id == delivery_id)).scalar()
    db.session.rollback()  # the read above must not hold SQLite's read lock into the writes
    if endpoint_id is None:
        return None
    # Written first: concurrent claims for one endpoint count its attempts in flight one at a time.
    _lock_endpoint(endpoint_id, now)
    endpoint = db.session.get(WebhookEndpoint, endpoint_id, populate_existing=True)
    if endpoint is None:
        db.session.rollback()
        return None
    if endpoint.disabled:
        db.session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING)
            .values(status=FAILED, finished_at=now, next_attempt_at=None, last_error=f"endpoint disabled: {endpoint.disabled_reason}"[:500])
        )
        db.session.commit()
        return None
    if _in_flight(endpoint_id, now) >= config.endpoint_concurrency:
        # Left pending and undispatched: the dispatcher (or the next attempt to end) sends it.
        db.session.execute(
            update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING).values(dispatched_at=None)
        )
        db.session.commit()
        return None
    row = db.session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .values(
            status=SENDING,
            attempts=WebhookDelivery.attempts + 1,
            tries=WebhookDelivery.tries + 1,
            lease_expires_at=now + timedelta(seconds=config.lease),
            last_attempt_at=now,
        )
        .returning(WebhookDelivery.attempts, WebhookDelivery.tries, WebhookDelivery.trigger, WebhookDelivery.created_at)
    ).one_or_none()
    db.session.commit()
    if row is None:
        return None
    return Claim(delivery_id, endpoint_id, row.attempts, row.tries, row.trigger, row.created_at)


def attempt(work: Claim) -> tuple[Result, str, str | None, str | None]:
    """Sign and send the claimed delivery; return ``(result, url, address, request_id)``.

    The URL is checked again (resolved, every address public or allowed) and the request goes
    to the address checked. No transaction is open while the receiver answers.
    """
    config = webhooks.settings()
    delivery = db.session.get(WebhookDelivery, work.delivery_id)
    endpoint = db.session.get(
        WebhookEndpoint,
        work.endpoint_id,
        options=[undefer(WebhookEndpoint.secret_encrypted), undefer(WebhookEndpoint.previous_secret_encrypted)],
    )
    message = messages.with_data(delivery.message_id) if delivery is not None else None
    if delivery is None or endpoint is None or message is None:
        db.session.rollback()
        return Result(None, 0, error="the delivery or its endpoint was deleted"), "", None, None
    url, request_id = endpoint.url, message.request_id
    try:
        signing = endpoints.signing_secrets(endpoint)
    except (secrets.SecretUnreadable, webhooks.SecretKeyUnset) as exc:
        db.session.rollback()
        return Result(None, 0, error=str(getattr(exc, "detail", exc))[:500]), url, None, request_id
    body = messages.payload(message)
    message_id = message.id
    db.session.rollback()  # nothing held while the receiver is slow
    try:
        target = config.guard.check(url)
    except UnsafeURL as exc:
        return Result(None, 0, error=f"refused: {exc}"[:500]), url, None, request_id
    timestamp = utcnow()
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": secrets.sign(signing, message_id, timestamp, body.decode()),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "accept-encoding": "identity",  # the excerpt is the body's first bytes as sent
    }
    trace = tracing.current()  # the trace of the request that published the event, when it is known
    if trace is not None:
        headers.update(trace.fields())
    return send(target, headers, body, config.timeout, config.verify), url, target.address, request_id


def _next_delay(tries: int, result: Result) -> float | None:
    """Seconds until the next try after a failed one, or None when the schedule is spent.

    The retry schedule's entry for this try with jitter (WEBHOOK_RETRY_JITTER, a fraction);
    a 429 or 503 with ``Retry-After`` waits what the receiver asked, up to
    WEBHOOK_MAX_RETRY_AFTER.
    """
    config = webhooks.settings()
    if tries >= config.max_tries:
        return None
    if result.retry_after is not None:
        return min(result.retry_after, config.max_retry_after)
    delay = config.retry_schedule[tries - 1]
    return delay * (1 + random.uniform(-config.retry_jitter, config.retry_jitter))


def record(work: Claim, result: Result, url: str, address: str | None, request_id: str | None, now: datetime | None = None) -> WebhookAttempt | None:
    """Store the attempt and the delivery's next state; disable the endpoint on a 410 or after
    WEBHOOK_DISABLE_AFTER seconds of failures. Returns the attempt row, or None when the claim
    was lost (the delivery was taken over, or deleted with its endpoint)."""
    config = webhooks.settings()
    now = now or utcnow()
    values: dict = {"lease_expires_at": None, "last_status_code": result.status_code, "last_error": result.error, "trigger": SCHEDULED}
    delay = None if result.succeeded or result.status_code == 410 or work.trigger == TEST else _next_delay(work.tries, result)
    if result.succeeded:
        values.update(status=SUCCEEDED, finished_at=now, next_attempt_at=None)
    elif delay is None:
        values.update(status=FAILED, finished_at=now, next_attempt_at=None)
    else:
        values.update(status=PENDING, next_attempt_at=now + timedelta(seconds=delay), dispatched_at=None)
    # The endpoint's row first, as claim() and an endpoint's deletion take it: one lock order
    # everywhere, so Postgres never finds two of them waiting on each other.
    _lock_endpoint(work.endpoint_id, now)
    if not db.session.execute(update(WebhookDelivery).where(_mine(work)).values(**values)).rowcount:
        db.session.rollback()
        log.info("webhook attempt not recorded: the claim was lost", extra={"delivery_id": work.delivery_id})
        return None
    row = WebhookAttempt(
        delivery_id=work.delivery_id,
        endpoint_id=work.endpoint_id,
        number=work.number,
        trigger=work.trigger,
        url=url,
        address=address,
        status_code=result.status_code,
        succeeded=result.succeeded,
        duration_ms=result.duration_ms,
        response_excerpt=None if result.excerpt is None else result.excerpt.replace("\x00", "\ufffd"),  # Postgres text has no NUL
        error=result.error,
        request_id=request_id,
        created_at=now,
    )
    db.session.add(row)
    disabled = None
    # A test send says nothing of the endpoint's health, nor does an attempt whose worker died.
    if work.trigger != TEST and result.error != LOST:
        disabled = _track_health(work.endpoint_id, result, now, config.disable_after)
    db.session.commit()
    metrics.WEBHOOK_ATTEMPTS.labels("succeeded" if result.succeeded else "failed").inc()
    if result.succeeded and work.trigger != TEST and work.created_at is not None:
        metrics.WEBHOOK_LAG_SECONDS.observe(max((now - work.created_at).total_seconds(), 0.0))
    if disabled is not None:
        messages.fan_out_later([disabled])
    log.info(
        "webhook attempt",
        extra={
            "delivery_id": work.delivery_id,
            "endpoint_id": work.endpoint_id,
            "attempt": work.number,
            "status_code": result.status_code,
            "duration_ms": result.duration_ms,
            "outcome": values["status"],
            "request_id": request_id,
        },
    )
    return row


def _track_health(endpoint_id: str, result: Result, now: datetime, disable_after: float) -> str | None:
    """Update the endpoint's failure record after an attempt; disable it on a 410 or when it
    has failed continuously for ``disable_after`` seconds. Returns the id of the
    ``webhook.endpoint.disabled`` message recorded, if any (in the caller's transaction)."""
    if result.succeeded:
        db.session.execute(
            update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id, WebhookEndpoint.failing_since.is_not(None)).values(failing_since=None)
        )
        return None
    # A run of failures is continuous: a silence longer than the longest retry gap (nothing
    # was sent, so nothing failed) starts a new run rather than extending the old one.
    silence = now - timedelta(seconds=_longest_gap())
    db.session.execute(
        update(WebhookEndpoint)
        .where(
            WebhookEndpoint.id == endpoint_id,
            or_(WebhookEndpoint.failing_since.is_(None), WebhookEndpoint.last_failure_at.is_(None), WebhookEndpoint.last_failure_at < silence),
        )
        .values(failing_since=now)
    )
    db.session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id).values(last_failure_at=now))
    endpoint = db.session.get(WebhookEndpoint, endpoint_id, populate_existing=True)
    if endpoint is None or endpoint.disabled:
        return None
    if result.status_code == 410:
        reason = "the receiver answered 410 Gone"
    elif endpoint.failing_since is not None and endpoint.failing_since <= now - timedelta(seconds=disable_after):
        reason = f"every attempt failed since {isoformat(endpoint.failing_since)}"
    else:
        return None
    return disable(endpoint, reason, now)


def _longest_gap() -> float:
    """The longest a failing delivery waits between two tries (seconds): the longest retry
    delay with its jitter, plus a dispatch interval and a lease for the try itself."""
    config = webhooks.settings()
    return max((*config.retry_schedule, 0.0)) * (1 + config.retry_jitter) + config.dispatch_interval + config.lease


def disable(endpoint: WebhookEndpoint, reason: str, now: datetime) -> str | None:
    """Disable ``endpoint``, fail its pending deliveries, and record a ``webhook.endpoint.disabled``
    message for its consumer (fanned out to its other endpoints after the caller commits).
    Returns the message id, or None when another attempt disabled it first. In the caller's
    transaction; the conditional write decides between attempts recorded at the same moment."""
    done = db.session.execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint.id, WebhookEndpoint.disabled.is_(False))
        .values(disabled=True, disabled_reason=reason, disabled_at=now)
    ).rowcount
    if not done:
        return None
    db.session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == PENDING)
        .values(status=FAILED, finished_at=now, next_attempt_at=None, last_error=f"endpoint disabled: {reason}"[:500])
    )
    data = {"endpoint_id": endpoint.id, "url": endpoint.url, "reason": reason, "failing_since": isoformat(endpoint.failing_since)}
    message = messages.new_message(
        endpoint.consumer_id, webhooks.ENDPOINT_DISABLED, data, event_id=f"{endpoint.id}.disabled.{int(now.timestamp() * 1000)}", created_at=now
    )
    db.session.add(message)
    db.session.flush()
    log.warning("webhook endpoint disabled", extra={"endpoint_id": endpoint.id, "reason": reason})
    return message.id


def deliver(delivery_id: str) -> str | None:
    """Claim, send and record one attempt of ``delivery_id``; return its new status, or None
    when there was nothing to do. Then hand the endpoint's freed slot to a waiting delivery."""
    work = claim(delivery_id)
    if work is None:
        return None
    try:
        result, url, address, request_id = attempt(work)
    except SoftTimeLimitExceeded:  # stuck outside the HTTP exchange (a hung DNS lookup): a failed try
        db.session.rollback()
        soft, _ = webhooks.time_limits(current_app.config)
        result, url, address, request_id = Result(None, int(soft * 1000), error=f"the attempt took longer than {soft:g} s"), _url(work.endpoint_id), None, None
    row = record(work, result, url, address, request_id)
    enqueue(_waiting(work.endpoint_id, limit=1))
    return None if row is None else ("succeeded" if result.succeeded else "failed")  # not row.succeeded: a re-read


def _waiting(endpoint_id: str, limit: int) -> list[str]:
    """Mark up to ``limit`` due, undispatched deliveries of an endpoint as dispatched; return their ids."""
    now = utcnow()
    ids = list(
        db.session.execute(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.endpoint_id == endpoint_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.dispatched_at.is_(None),
                WebhookDelivery.next_attempt_at <= now,
            )
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        ).scalars()
    )
    if not ids:
        db.session.rollback()
        return []
    taken = db.session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id.in_(ids), WebhookDelivery.dispatched_at.is_(None)).values(dispatched_at=now)
    ).rowcount
    db.session.commit()
    return ids if taken else []


def enqueue(delivery_ids: list[str]) -> list[str]:
    """Send a ``deliver`` message per delivery; return the ids whose message could not be sent
    (marked undispatched, so the dispatcher sends them on its next pass)."""
    return queue.send_each(
        queue.DELIVER,
        delivery_ids,
        "delivery",
        lambda failed: update(WebhookDelivery).where(WebhookDelivery.id.in_(failed), WebhookDelivery.status == PENDING).values(dispatched_at=None),
    )


def dispatch(limit: int = 500) -> dict[str, int]:
    """Beat's pass (every WEBHOOK_DISPATCH_INTERVAL seconds); return counts by action.

    - publishes the jobs' outbox as messages;
    - fans out messages whose fan-out message was lost (older than WEBHOOK_REQUEUE_AFTER);
    - records attempts whose worker was lost (lease lapsed) and schedules their next try;
    - enqueues due deliveries (rows locked with SKIP LOCKED on Postgres), no more per endpoint
      than its free slots under WEBHOOK_ENDPOINT_CONCURRENCY.
    """
    config = webhooks.settings()
    counts = {"published": messages.publish_job_events(limit), "fanned_out": 0, "lost": 0, "dispatched": 0}
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
        created = messages.fan_out(message_id)
        counts["fanned_out"] += 1
        enqueue(created)

    lapsed = lock_rows(
        select(WebhookDelivery).where(WebhookDelivery.status == SENDING, WebhookDelivery.lease_expires_at < now).limit(limit)
    )
    works = [Claim(row.id, row.endpoint_id, row.attempts, row.tries, row.trigger) for row in lapsed]
    db.session.rollback()
    for work in works:
        if record(work, Result(None, 0, error=LOST), _url(work.endpoint_id), None, None) is not None:
            counts["lost"] += 1

    waiting = and_(
        WebhookDelivery.status == PENDING,
        WebhookDelivery.next_attempt_at <= now,
        or_(WebhookDelivery.dispatched_at.is_(None), WebhookDelivery.dispatched_at <= now - timedelta(seconds=config.requeue_after)),
    )
    # At most an endpoint's cap of its own oldest: one endpoint's backlog never fills the
    # batch and leaves every other endpoint's retries waiting behind it.
    ranked = (
        select(
            WebhookDelivery.id,
            func.row_number().over(partition_by=WebhookDelivery.endpoint_id, order_by=WebhookDelivery.next_attempt_at).label("rank"),
        )
        .where(waiting)
        .subquery()
    )
    firsts = select(ranked.c.id).where(ranked.c.rank <= config.endpoint_concurrency)
    due = lock_rows(
        select(WebhookDelivery).where(WebhookDelivery.id.in_(firsts), waiting).order_by(WebhookDelivery.next_attempt_at).limit(limit)
    )
    busy = Counter(
        dict(
            db.session.execute(
                select(WebhookDelivery.endpoint_id, func.count())
                .where(
                    WebhookDelivery.endpoint_id.in_({row.endpoint_id for row in due}),
                    # In flight: being sent, or handed to a worker lately and not yet claimed.
                    or_(
                        and_(WebhookDelivery.status == SENDING, WebhookDelivery.lease_expires_at > now),
                        and_(WebhookDelivery.status == PENDING, WebhookDelivery.dispatched_at > now - timedelta(seconds=config.requeue_after)),
                    ),
                )
                .group_by(WebhookDelivery.endpoint_id)
            ).all()
        )
    ) if due else Counter()
    chosen = []
    for row in due:
        if busy[row.endpoint_id] < config.endpoint_concurrency:
            busy[row.endpoint_id] += 1
            row.dispatched_at = now
            chosen.append(row.id)
    db.session.commit()
    enqueue(chosen)
    counts["dispatched"] = len(chosen)
    return counts


def _url(endpoint_id: str) -> str:
    url = db.session.execute(select(WebhookEndpoint.url).where(WebhookEndpoint.id == endpoint_id)).scalar()
    db.session.rollback()
    return url or ""


def sweep(limit: int = 1000) -> dict[str, int]:
    """Delete final deliveries (with their attempts) and messages older than WEBHOOK_RETENTION
    seconds; return counts. Messages go once no delivery of theirs is left."""
    config = webhooks.settings()
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
    messages = list(
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
    if messages:
        db.session.execute(delete(WebhookMessage).where(WebhookMessage.id.in_(messages)))
    db.session.commit()
    return {"deliveries": len(old), "messages": len(messages)}


# -- what the API asks for ---------------------------------------------------------------------


class EndpointBusy(Exception):
    """The endpoint already has WEBHOOK_ENDPOINT_CONCURRENCY attempts in flight."""


def send_test(endpoint: WebhookEndpoint, request_id: str | None) -> WebhookAttempt | None:
    """Send a ``webhook.test`` message to ``endpoint`` now, in this process, and return the
    attempt (one try, never retried; disabled endpoints too, so a fix can be checked first).

    A test takes one of the endpoint's WEBHOOK_ENDPOINT_CONCURRENCY slots like any attempt:
    raises EndpointBusy when none is free, so tests cannot pile up in the web process.
    """
    config = webhooks.settings()
    now = utcnow()
    _lock_endpoint(endpoint.id, now)
    if _in_flight(endpoint.id, now) >= config.endpoint_concurrency:
        db.session.rollback()
        raise EndpointBusy(endpoint.id)
    data = {"endpoint_id": endpoint.id, "message": "a test delivery from the gateway"}
    message = messages.new_message(endpoint.consumer_id, webhooks.TEST_EVENT, data, request_id=request_id, created_at=now, fanned_out_at=now)
    db.session.add(message)
    db.session.flush()
    delivery = WebhookDelivery(
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
    db.session.commit()
    work = Claim(delivery.id, endpoint.id, 1, 1, TEST)
    result, url, address, _ = attempt(work)
    return record(work, result, url, address, request_id)


class DeliveryBusy(Exception):
    """The delivery is being sent right now."""


def redeliver(delivery: WebhookDelivery) -> WebhookDelivery:
    """Send ``delivery`` again, with the same ``webhook-id``, starting its retry schedule over.
    Raises DeliveryBusy while an attempt is in flight. Commits and enqueues."""
    now = utcnow()
    done = db.session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery.id, WebhookDelivery.status != SENDING)
        .values(status=PENDING, trigger=MANUAL, tries=0, next_attempt_at=now, dispatched_at=now, finished_at=None)
    ).rowcount
    if not done:
        db.session.rollback()
        raise DeliveryBusy(delivery.id)
    db.session.commit()
    enqueue([delivery.id])
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
