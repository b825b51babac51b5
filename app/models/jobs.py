"""Async jobs: the request a worker makes for a client, its state, result, sub-requests and events.

The row is the source of truth for a job. It is written (and committed) before a Celery
message names it, and every change a worker makes is conditional on the attempt it holds, so
a worker that lost its claim cannot overwrite the one that took over.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
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

# The states of the Microsoft REST API guidelines' long-running operations.
NOT_STARTED, RUNNING, SUCCEEDED, FAILED, CANCELED = "notStarted", "running", "succeeded", "failed", "canceled"
STATUSES = (NOT_STARTED, RUNNING, SUCCEEDED, FAILED, CANCELED)
FINAL = frozenset({SUCCEEDED, FAILED, CANCELED})

REQUEST, BATCH = "request", "batch"


class Job(db.Model):
    """One job: a single upstream request (``kind`` request) or several (``kind`` batch).

    For a request job the snapshot (method, paths, headers, body) and the upstream's answer
    (``result_*``) live on this row; a batch keeps them on its JobItem rows. Payloads are
    cleared once the job expires (``purged_at``); the row stays, so its id answers 410.
    Payload columns are deferred: a poll or a list never reads bodies it does not return.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("idempotency_scope", "idempotency_key", name="uq_jobs_idempotency"),
        Index("ix_jobs_consumer_created", "consumer_id", "created_at"),
        Index("ix_jobs_status_enqueued", "status", "enqueued_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    consumer_id: Mapped[str | None] = mapped_column(ForeignKey("consumers.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16), default=REQUEST)
    status: Mapped[str] = mapped_column(String(16), default=NOT_STARTED)
    progress: Mapped[int] = mapped_column(Integer, default=0)  # percent, 0-100
    progress_message: Mapped[str | None] = mapped_column(String(200))
    route: Mapped[str | None] = mapped_column(String(200))  # the route's name (or path), for display
    # The request snapshot: what the worker sends, as the sync route would have sent it.
    method: Mapped[str | None] = mapped_column(String(16))
    path: Mapped[str | None] = mapped_column(Text)  # the gateway path, decoded (matched by the router)
    raw_path: Mapped[str | None] = mapped_column(Text)  # as the client sent it, percent-encoded
    query: Mapped[str | None] = mapped_column(Text)
    request_headers: Mapped[list | None] = deferred(mapped_column(JSON))  # [[name, value], ...]
    request_body: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    client: Mapped[dict | None] = mapped_column(JSON)  # {"addr", "scheme", "host"}: X-Forwarded-*
    principal: Mapped[dict | None] = mapped_column(JSON)  # {"consumer_id", "consumer_name", "scopes"}
    # The upstream's answer, as it was.
    result_status: Mapped[int | None] = mapped_column(Integer)
    result_headers: Mapped[list | None] = deferred(mapped_column(JSON))
    result_body: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    result_size: Mapped[int | None] = mapped_column(Integer)  # bytes of result_body
    error: Mapped[dict | None] = mapped_column(JSON)  # a problem object (RFC 9457)
    idempotency_scope: Mapped[str | None] = mapped_column(String(80))  # consumer id, or "ip:<addr>"
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))  # SHA-256 of what was asked
    request_id: Mapped[str | None] = mapped_column(String(200))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker has claimed it
    enqueues: Mapped[int] = mapped_column(Integer, default=0)  # messages sent for it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # the claim, renewed while running
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)  # set when final
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)

    @property
    def final(self) -> bool:
        return self.status in FINAL


class JobItem(db.Model):
    """One sub-request of a batch job, with its own snapshot and result."""

    __tablename__ = "job_items"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0-based, as submitted
    status: Mapped[str] = mapped_column(String(16), default=NOT_STARTED)
    route: Mapped[str | None] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    raw_path: Mapped[str] = mapped_column(Text)
    query: Mapped[str] = mapped_column(Text, default="")
    request_headers: Mapped[list] = deferred(mapped_column(JSON, default=list, nullable=False))
    request_body: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    result_status: Mapped[int | None] = mapped_column(Integer)
    result_headers: Mapped[list | None] = deferred(mapped_column(JSON))
    result_body: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    error: Mapped[dict | None] = mapped_column(JSON)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class JobEvent(db.Model):
    """An outbox row per job event (``job.succeeded``, ``job.failed``, ``job.canceled``).

    Written in the transaction that makes the job final, so an event exists exactly when the
    state change does; a publisher (webhooks) reads rows with no ``published_at`` and sets it.
    """

    __tablename__ = "job_events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("evt"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    consumer_id: Mapped[str | None] = mapped_column(String(40))
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict] = mapped_column(JSON)  # the job resource at the time of the event, without URLs
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
