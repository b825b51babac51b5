"""Webhooks: a consumer's endpoints, the messages (events) it publishes, their deliveries and attempts.

A message is recorded once; fan-out makes one delivery per matching enabled endpoint (unique
per message and endpoint, so a second fan-out adds nothing); each try at sending a delivery is
an attempt row. The delivery row is the unit of work: its ``next_attempt_at`` is when it is
due, and every write a worker makes is conditional on the attempt number it claimed.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, deferred, mapped_column

from app.extensions import db
from app.models.base import UTCDateTime, new_id, utcnow

# A delivery's states. ``sending`` holds a lease: a worker that dies leaves it to lapse.
PENDING, SENDING, SUCCEEDED, FAILED = "pending", "sending", "succeeded", "failed"
DELIVERY_STATUSES = (PENDING, SENDING, SUCCEEDED, FAILED)

# Why an attempt was made.
SCHEDULED, MANUAL, TEST = "scheduled", "manual", "test"


class WebhookEndpoint(db.Model):
    """A consumer's HTTPS receiver, the event types it wants, and its signing secrets.

    Secrets are Fernet tokens (``secret_encrypted``), never plain text. During a rotation the
    previous secret is kept until ``previous_secret_expires_at`` and deliveries carry both
    signatures. ``failing_since`` is the first of a run of failed attempts with no success and
    no long silence between them; ``last_failure_at`` the latest.
    """

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_consumer_created", "consumer_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ep"))
    consumer_id: Mapped[str] = mapped_column(ForeignKey("consumers.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(String(500), default="")
    event_types: Mapped[list] = mapped_column(JSON, default=list)  # names and "prefix.*"; [] means all
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled_reason: Mapped[str | None] = mapped_column(String(500))
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    secret_encrypted: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    previous_secret_encrypted: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_failure_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Written by a test send as its first statement: the lock keeps claims from counting the
    # endpoint's free slots meanwhile.
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookMessage(db.Model):
    """One event: ``{type, data}`` for a consumer's endpoints. Its id is the ``webhook-id`` of
    every delivery of it. ``event_id`` (the publisher's own id) makes publishing idempotent;
    ``fanned_out_at`` stays empty until its deliveries exist (the outbox mark)."""

    __tablename__ = "webhook_messages"
    __table_args__ = (
        UniqueConstraint("consumer_id", "event_id", name="uq_webhook_messages_event"),
        Index("ix_webhook_messages_consumer_created", "consumer_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("msg"))
    consumer_id: Mapped[str] = mapped_column(ForeignKey("consumers.id", ondelete="CASCADE"))
    event_id: Mapped[str | None] = mapped_column(String(255))
    type: Mapped[str] = mapped_column(String(255))
    data: Mapped[object] = deferred(mapped_column(JSON))
    payload_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of type and data: same id, same event?
    request_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    fanned_out_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class WebhookDelivery(db.Model):
    """A message on its way to one endpoint: pending (due at ``next_attempt_at``), sending
    (claimed until ``lease_expires_at``), succeeded, or failed after the last scheduled try.

    ``attempts`` counts every try and is the fencing token of a claim; ``tries`` counts the
    tries of the current schedule, which a redelivery starts again.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("message_id", "endpoint_id", name="uq_webhook_deliveries_message_endpoint"),
        Index("ix_webhook_deliveries_status_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
        # A claim's range per endpoint: its oldest due deliveries, and its attempts in flight.
        Index("ix_webhook_deliveries_endpoint_status_due", "endpoint_id", "status", "next_attempt_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("dlv"))
    message_id: Mapped[str] = mapped_column(ForeignKey("webhook_messages.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id", ondelete="CASCADE"))
    consumer_id: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    trigger: Mapped[str] = mapped_column(String(16), default=SCHEDULED)  # what the next attempt is for
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    tries: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # due; None once final
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class WebhookAttempt(db.Model):
    """One HTTP request of a delivery: when, how long (milliseconds), the status code, the first
    bytes of the response (WEBHOOK_RESPONSE_EXCERPT), or the error when no response came."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery_number", "delivery_id", "number"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("atm"))
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    endpoint_id: Mapped[str] = mapped_column(String(40), index=True)
    number: Mapped[int] = mapped_column(Integer)  # the delivery's attempt count at this try, from 1
    trigger: Mapped[str] = mapped_column(String(16), default=SCHEDULED)
    url: Mapped[str] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(String(64))  # the IP address connected to
    status_code: Mapped[int | None] = mapped_column(Integer)
    succeeded: Mapped[bool] = mapped_column(Boolean, default=False)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    response_excerpt: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(String(500))
    request_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
