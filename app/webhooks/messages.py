"""Webhook messages: event types and filters, recording an event as a message (once per event
id), fanning it out into one delivery per matching endpoint, and the jobs' outbox published as
messages."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from datetime import datetime

from flask import current_app
from redis.exceptions import RedisError
from sqlalchemy import Integer, bindparam, insert, or_, select, text, update
from sqlalchemy.orm import undefer
from sqlalchemy.sql import Executable

from app import queue
from app.errors import ProblemError
from app.extensions import (
    DriverStatement,
    among,
    db,
    driver_transaction,
    insert_alone,
    insert_once,
    redis_client,
)
from app.models import WebhookDelivery, WebhookEndpoint, WebhookMessage
from app.models.base import UTCDateTime, isoformat, new_id, utcnow, written
from app.models.webhooks import PENDING, SCHEDULED
from app.webhooks.settings import settings

log = logging.getLogger("frontdoor.webhooks")

# Event type names: dot-separated segments (``job.succeeded``); a filter may end in ``.*``.
_TYPE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_TYPE_LENGTH = 255
# Types the gateway itself publishes; consumers may subscribe to them but not publish them.
RESERVED_PREFIXES = ("job.", "webhook.")
ENDPOINT_DISABLED = "webhook.endpoint.disabled"
TEST_EVENT = "webhook.test"


class EventIdReused(ProblemError):
    """409: an event id already names an event with another type or data."""

    status, title, slug = 409, "Conflict", "event-id-reused"


# -- event types -----------------------------------------------------------------------------


def check_type(name: str) -> str:
    """``name`` when it is an event type name (``a.b_c``, at most 255 characters); raises ValueError."""
    if len(name) > MAX_TYPE_LENGTH or not _TYPE.fullmatch(name):
        raise ValueError(f"{name!r} is not an event type: dot-separated letters, digits, '_' and '-'")
    return name


def check_filter(pattern: str) -> str:
    """An event type filter: a type name, ``prefix.*`` (every type under prefix) or ``*``."""
    if pattern == "*" or (pattern.endswith(".*") and _TYPE.fullmatch(pattern[:-2]) and len(pattern) <= MAX_TYPE_LENGTH):
        return pattern
    try:
        return check_type(pattern)
    except ValueError:
        raise ValueError(f"{pattern!r} is not an event type or a filter such as 'job.*'") from None


def matches(filters: list[str], event_type: str) -> bool:
    """Whether an endpoint with ``filters`` wants ``event_type``: no filters means every type;
    ``job.*`` matches ``job.succeeded`` and ``job.batch.done``, not ``job`` or ``jobs.x``."""
    return not filters or any(
        pattern in ("*", event_type) or (pattern.endswith(".*") and event_type.startswith(pattern[:-1]))
        for pattern in filters
    )


# -- messages --------------------------------------------------------------------------------


def message_json(message: WebhookMessage, data: bool = False) -> dict:
    found = {
        "id": message.id,
        "event_id": message.event_id,
        "type": message.type,
        "created_at": isoformat(message.created_at),
        "request_id": message.request_id,
    }
    if data:
        found["data"] = message.data
    return found


def payload(event_type: str, created_at: datetime, data: object) -> bytes:
    """The body every delivery of a message sends: ``{"type", "timestamp", "data"}`` as compact
    JSON (Standard Webhooks, "Payload structure"), the same bytes on every retry."""
    body = {"type": event_type, "timestamp": isoformat(created_at), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def _digest(event_type: str, data: object) -> str:
    return hashlib.sha256(json.dumps([event_type, data], sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def new_message(consumer_id: str, event_type: str, data: object, **fields) -> WebhookMessage:
    """A message row (not yet added to the session) with its payload hash; ``fields`` are the
    other columns (``event_id``, ``request_id``, ``created_at``, ``fanned_out_at``)."""
    return WebhookMessage(consumer_id=consumer_id, type=event_type, data=data, payload_hash=_digest(event_type, data), **fields)


def record_message(consumer_id: str, event_type: str, data: object, event_id: str | None = None, request_id: str | None = None, fanned_out: bool = False) -> tuple[WebhookMessage, bool]:
    """Write a message and commit (one INSERT, no read back); return ``(message, created)``.

    With ``event_id`` a repeat of an earlier event (same id, type and data) returns the earlier
    message with ``created`` False; raises EventIdReused (409) when the id names another event.
    Enqueueing its fan-out is the caller's job, after this commit (``fan_out_later``).
    """
    digest = _digest(event_type, data)

    def write() -> WebhookMessage:
        now = utcnow()
        values = {
            "id": new_id("msg"), "consumer_id": consumer_id, "event_id": event_id, "type": event_type, "data": data,
            "payload_hash": digest, "request_id": request_id, "created_at": now, "fanned_out_at": now if fanned_out else None,
        }
        if db.session().in_transaction():  # the caller's writes commit with it
            db.session.execute(insert(WebhookMessage), values)
            db.session.commit()
        else:  # one statement that commits by itself; nothing is read back
            insert_alone(WebhookMessage.__table__, values, settings().event_synchronous_commit)
        return written(WebhookMessage, values)

    return insert_once(event_id, lambda: _by_event_id(consumer_id, event_id), lambda earlier: _same(earlier, digest), write)


def _by_event_id(consumer_id: str, event_id: str) -> WebhookMessage | None:
    return db.session.execute(
        select(WebhookMessage).where(WebhookMessage.consumer_id == consumer_id, WebhookMessage.event_id == event_id)
    ).scalar_one_or_none()


def _same(earlier: WebhookMessage, digest: str) -> WebhookMessage:
    if earlier.payload_hash != digest:
        raise EventIdReused(f"The event id {earlier.event_id!r} was published with another type or data ({earlier.id})")
    return earlier


# With Redis: set while a fan-out message is queued and its task has not started. A fan-out takes
# every message waiting for one (up to a batch), so a message committed meanwhile needs no
# message of its own. Seconds: a fan-out message lost with the mark set only delays others this long.
FAN_OUT_PENDING_TTL = 5


def _pending_key() -> str:
    return f"{current_app.config['KEY_PREFIX']}:webhooks:fan-out-pending"


def fan_out_later(message_ids: list[str]) -> None:
    """Have the messages fanned out (after their commit): one fan-out message takes them all,
    and other messages waiting, up to a batch. With Redis, none is sent while one is queued and
    not yet started (it will take these too); without it, or when Redis fails, one per message.
    A lost one is redone by the dispatcher."""
    if not message_ids:
        return
    client = redis_client(current_app)
    if client is not None:
        try:
            if not client.set(_pending_key(), "1", nx=True, ex=FAN_OUT_PENDING_TTL):
                return
            message_ids = message_ids[:1]
        except RedisError:
            log.warning("the fan-out mark could not be read; sending the fan-out messages", exc_info=True)
    queue.send_each(queue.FAN_OUT, message_ids, "fan-out")


# Whether the last fan-out of this process took several messages but had room for more: events
# arriving faster than fan-outs start, not a backlog (a Celery pool process runs one task at a time).
_streaming = False


def taking_fan_outs() -> None:
    """Clear the pending mark as a fan-out starts, before it reads the waiting messages: a
    message committed after that read sees no mark and sends a fan-out of its own.

    When this process's last fan-out took several messages and had room for more (events
    arriving faster than fan-outs start, not a backlog), first wait WEBHOOK_FAN_OUT_LINGER
    seconds with the mark still set: the events published meanwhile join this batch, rather
    than every few of them paying a task, a claim and a record of their own (as Kafka's
    producers linger). One event at a time, or a backlog, never waits."""
    config = settings()
    if config.fan_out_linger > 0 and _streaming:
        time.sleep(config.fan_out_linger)
    client = redis_client(current_app)
    if client is not None:
        try:
            client.delete(_pending_key())
        except RedisError:
            log.warning("the fan-out mark could not be cleared; it lapses by itself", exc_info=True)


def fan_out(message_id: str, more: int = 0) -> list[str]:
    """Make one pending delivery per enabled endpoint of the message's consumer whose filters
    match its type, mark the message fanned out, commit; return the new deliveries' ids (the
    caller sends them). With ``more``, up to that many other messages still waiting for their
    fan-out (the oldest; their own fan-out tasks are queued behind this one) are fanned out in
    the same transaction, so that one batch sends them all. A message already fanned out gets
    nothing more: safe to run twice. Three statements and a commit: the claim (returning what
    the rest needs), the endpoints, one multi-row insert; on Postgres on psycopg's cursor
    (``app.extensions.driver``), with the statements compiled once."""
    now = utcnow()
    values = {"message_id": message_id, "more": more, "now": now}
    if db.engine.dialect.name == "postgresql":
        claim, endpoints = _postgres_fan_out(more > 0)
        with driver_transaction() as cursor:
            claimed = cursor.execute(claim.sql, claim.params(values)).fetchall()
            found = cursor.execute(endpoints.sql, endpoints.params({"consumers": list({m.consumer_id for m in claimed})})).fetchall() if claimed else []
            rows = _deliveries(claimed, found, now)
            if rows:
                cursor.execute(_DELIVERIES.sql, _DELIVERIES.params({
                    "now": now, "status": PENDING, "trigger": SCHEDULED,
                    **{key: [row[column] for row in rows] for key, column in (
                        ("ids", "id"), ("messages", "message_id"), ("endpoints", "endpoint_id"), ("consumers", "consumer_id"))},
                }))
    else:
        # The conditional write comes first: it is the claim (two fan-outs, one winner), and on
        # SQLite a transaction that starts by writing never has to upgrade a read lock.
        claim, endpoints = _fan_out_statements(False, more > 0)
        conn = db.session.connection()
        claimed = conn.execute(claim, values).all()
        found = conn.execute(endpoints, {"consumers": list({m.consumer_id for m in claimed})}).all() if claimed else []
        rows = _deliveries(claimed, found, now)
        if rows:
            conn.execute(insert(WebhookDelivery), rows)
        db.session.commit()
    if more > 0:
        full = sum(1 for message in claimed if message.id != message_id) >= more
        global _streaming
        _streaming = len(claimed) > 1 and not full
        if full:
            fan_out_later([message_id])  # it took as many others as it could: more may be waiting
    return [row["id"] for row in rows]


@functools.lru_cache(maxsize=4)
def _fan_out_statements(postgres: bool, with_more: bool) -> tuple[Executable, Executable]:
    """The fan-out's claim of its messages (``message_id``, and with ``with_more`` up to
    ``more`` others waiting, which on Postgres another fan-out has not locked) and its read of
    the endpoints of their ``consumers``, built once."""
    wanted = WebhookMessage.id == bindparam("message_id")
    if with_more:
        waiting = (
            select(WebhookMessage.id)
            .where(WebhookMessage.fanned_out_at.is_(None), WebhookMessage.id != bindparam("message_id"))
            .order_by(WebhookMessage.created_at)
            .limit(bindparam("more", type_=Integer()))
        )
        if postgres:
            waiting = waiting.with_for_update(skip_locked=True)  # another fan-out's are its own
        wanted = or_(wanted, WebhookMessage.id.in_(waiting.scalar_subquery()))
    claim = (
        update(WebhookMessage)
        .where(wanted, WebhookMessage.fanned_out_at.is_(None))
        .values(fanned_out_at=bindparam("now", type_=UTCDateTime()))
        .returning(WebhookMessage.id, WebhookMessage.consumer_id, WebhookMessage.type)
    )
    endpoints = select(WebhookEndpoint.id, WebhookEndpoint.consumer_id, WebhookEndpoint.event_types).where(
        among(WebhookEndpoint.consumer_id, "consumers", postgres), WebhookEndpoint.disabled.is_(False)
    )
    return claim, endpoints


@functools.lru_cache(maxsize=2)
def _postgres_fan_out(with_more: bool) -> tuple[DriverStatement, DriverStatement]:
    claim, endpoints = _fan_out_statements(True, with_more)
    return DriverStatement.of(claim), DriverStatement.of(endpoints)


# Postgres: a fan-out's deliveries in one INSERT whatever their number (the values as arrays).
_DELIVERIES = DriverStatement.of(text("""
INSERT INTO webhook_deliveries (id, message_id, endpoint_id, consumer_id, status, trigger, attempts, tries, next_attempt_at, created_at)
SELECT d.id, d.message_id, d.endpoint_id, d.consumer_id, :status, :trigger, 0, 0, :now, :now
FROM unnest(CAST(:ids AS text[]), CAST(:messages AS text[]), CAST(:endpoints AS text[]), CAST(:consumers AS text[]))
    AS d(id, message_id, endpoint_id, consumer_id)
"""))


def _deliveries(claimed: list, found: list, now: datetime) -> list[dict]:
    """One pending delivery (as column values) per claimed message and enabled endpoint of its
    consumer whose filters match the message's type."""
    endpoints: dict[str, list] = {}
    for endpoint in found:
        endpoints.setdefault(endpoint.consumer_id, []).append(endpoint)
    return [
        {"id": new_id("dlv"), "message_id": message.id, "endpoint_id": endpoint.id, "consumer_id": message.consumer_id,
         "status": PENDING, "trigger": SCHEDULED, "attempts": 0, "tries": 0, "next_attempt_at": now, "created_at": now}
        for message in claimed
        for endpoint in endpoints.get(message.consumer_id, ())
        if matches(endpoint.event_types or [], message.type)
    ]


def publish_job_events(limit: int = 500) -> int:
    """Publish the jobs' outbox (``job_events`` rows not yet published) as messages, each
    keyed by its event id so that publishing twice records one message; return how many
    messages were made. Anonymous jobs have no endpoints: their events are only marked.

    The rows are taken with one conditional write first (the transaction's first statement,
    as SQLite needs), so two publishers running at once never take the same event.
    """
    from app.models import JobEvent

    now = utcnow()
    pending = select(JobEvent.id).where(JobEvent.published_at.is_(None)).order_by(JobEvent.created_at).limit(limit)
    taken = list(
        db.session.execute(
            update(JobEvent)
            .where(JobEvent.id.in_(pending.scalar_subquery()), JobEvent.published_at.is_(None))
            .values(published_at=now)
            .returning(JobEvent.id)
        ).scalars()
    )
    made = []
    if taken:
        events = db.session.execute(select(JobEvent).where(JobEvent.id.in_(taken)).order_by(JobEvent.created_at)).scalars()
        for event in events:
            if event.consumer_id is None or _by_event_id(event.consumer_id, event.id) is not None:
                continue
            message = new_message(
                event.consumer_id, event.type, event.data, event_id=event.id, request_id=(event.data or {}).get("request_id"), created_at=event.created_at
            )
            db.session.add(message)
            made.append(message)
    db.session.commit()
    fan_out_later([message.id for message in made])
    return len(made)


def publish_job_events_later() -> None:
    """Ask a worker to publish the jobs' outbox now (called after a commit that wrote a job
    event), rather than at beat's next dispatch; a lost message only delays them until then."""
    try:
        queue.send(queue.PUBLISH_JOB_EVENTS, retry_policy={"max_retries": 1, "interval_start": 0.1})
    except Exception:
        log.warning("job event publish enqueue failed; the dispatcher will publish them", exc_info=True)


def with_data(message_id: str) -> WebhookMessage | None:
    return db.session.get(WebhookMessage, message_id, options=[undefer(WebhookMessage.data)])
