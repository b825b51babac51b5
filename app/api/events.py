"""``/_gateway/events``: publish an event to a consumer's subscribed webhook endpoints.

The event is recorded as a message (``msg_...``) and committed, then a fan-out task makes
one delivery per matching enabled endpoint. A caller-supplied ``id`` makes publishing
idempotent: the same id with the same event answers the earlier message.
"""
from __future__ import annotations

import json
from typing import Annotated, Any

from flask import Blueprint, g, url_for
from pydantic import AfterValidator, Field

from app.api import schemas
from app.api.common import Reply, Schema, body, found, invalid, operation, reply
from app.api.idempotency import HEADER as IDEMPOTENCY_KEY
from app.api.idempotency import idempotent
from app.api.inputs import ConsumerReference, stored_text
from app.auth import manage
from app.auth.authenticate import InsufficientScope
from app.auth.views import current_principal
from app.models import WebhookMessage
from app.webhooks import messages
from app.webhooks.settings import settings

bp = Blueprint("events", __name__)


EventId = stored_text(WebhookMessage.event_id, min_length=1)


class EventCreate(Schema):
    type: Annotated[str, AfterValidator(messages.check_type)]
    data: Any = Field(default_factory=dict)
    id: EventId | None = None  # type: ignore[valid-type]  # the publisher's event id
    consumer: ConsumerReference | None = None  # id or name; only with the admin scope (default: the caller)


@bp.post("/events")
@operation(
    "Publish an event",
    {
        202: Reply(schemas.Message, "The message, recorded; its deliveries are being made", ("Location", "Idempotent-Replayed?"), location="events.read"),
        200: Reply(schemas.Message, "The earlier message with the same ``id``", ("Location", "Idempotent-Replayed"), location="events.read"),
    },
    body=EventCreate,
    errors=(403, 409),
    params=(IDEMPOTENCY_KEY,),
)
@idempotent
def publish() -> tuple:
    """Record an event ``{"type", "data", "id"?}`` for the caller's endpoints: 202 with the
    message. A repeat of an ``id`` with the same type and data answers 200 with the earlier
    message and ``Idempotent-Replayed: true``; the same id for another event is 409. Types
    under ``job.`` and ``webhook.`` are the gateway's own (422); ``data`` is at most
    WEBHOOK_MAX_PAYLOAD bytes as JSON (422)."""
    principal = current_principal()
    assert principal is not None  # this view requires a credential (the default policy)
    data = body(EventCreate)
    if data.type.startswith(messages.RESERVED_PREFIXES):
        raise invalid("type", f"types under {' and '.join(messages.RESERVED_PREFIXES)} are published by the gateway itself")
    limit = settings().max_payload
    try:
        size = len(json.dumps(data.data, separators=(",", ":"), ensure_ascii=False).encode())  # as deliveries send it
    except UnicodeEncodeError:
        raise invalid("data", "contains a lone surrogate (\\ud800-\\udfff), which UTF-8 cannot carry") from None
    if size > limit:
        raise invalid("data", f"{size} bytes as JSON exceeds the limit of {limit} bytes (WEBHOOK_MAX_PAYLOAD)")
    consumer_id = principal.consumer_id
    if data.consumer not in (None, principal.consumer_id, principal.consumer_name):
        if not principal.is_admin:
            raise InsufficientScope("Only a caller with the admin scope may publish events for another consumer")
        consumer = manage.find_consumer(data.consumer)
        if consumer is None:
            raise invalid("consumer", f"no consumer has the id or name {data.consumer!r}")
        consumer_id = consumer.id
    message, created = messages.record_message(consumer_id, data.type, data.data, data.id, g.get("request_id"))
    if created:
        messages.fan_out_later([message.id])
    headers = {"Location": url_for("events.read", message_id=message.id, _external=True)}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return reply(schemas.Message, messages.message_json(message), 202 if created else 200, headers)


@bp.get("/events/<id:message_id>")
@operation("Read an event", {200: Reply(schemas.MessageWithData, "The message with its data")}, errors=(404,))
def read(message_id: str) -> tuple:
    """The message with its ``data``: the caller's own (404 otherwise)."""
    principal = current_principal()
    assert principal is not None
    message = messages.with_data(message_id)
    if message is not None and message.consumer_id != principal.consumer_id:
        message = None
    return reply(schemas.MessageWithData, messages.message_json(found(message, "event", message_id), data=True))

