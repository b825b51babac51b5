"""Idempotency keys of the gateway's own API: the first answer to a creating POST, kept to be replayed."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models.base import UTCDateTime, utcnow


class IdempotentRequest(db.Model):
    """A caller's ``Idempotency-Key`` on a POST that creates something: what the request was
    (``fingerprint``, SHA-256 of method, path, query and body) and the answer it got (``status``
    None while it is still being handled; ``body`` and the ``headers`` worth replaying)."""

    __tablename__ = "idempotent_requests"

    scope: Mapped[str] = mapped_column(String(80), primary_key=True)  # the consumer's id, or "ip:<addr>"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    body: Mapped[str | None] = mapped_column(Text)
    headers: Mapped[dict | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
