"""Consumers (who calls) and their API keys (how they prove it)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.extensions import db
from app.models.base import UTCDateTime, new_id, utcnow


class Consumer(db.Model):
    """A caller of the gateway: an application, a partner, a team. ``plan`` picks its rate limit."""

    __tablename__ = "consumers"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("con"))
    name: Mapped[str] = mapped_column(String(200), unique=True)
    plan: Mapped[str | None] = mapped_column(String(64))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    keys: Mapped[list[ApiKey]] = relationship(back_populates="consumer")


class ApiKey(db.Model):
    """An API key: only a SHA-256 of the secret is kept; ``prefix`` is the part safe to show.

    The key itself (``fd_live_…``) is shown once, when it is created. Keys carry 190 bits of
    randomness, so a fast hash is enough: there is nothing to brute-force, and a slow password
    hash would put a deliberate cost on every cache miss of the request path.
    """

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    consumer_id: Mapped[str] = mapped_column(ForeignKey("consumers.id", ondelete="CASCADE"), index=True)
    prefix: Mapped[str] = mapped_column(String(32))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rotated_from: Mapped[str | None] = mapped_column(String(40))  # the key this one replaces

    consumer: Mapped[Consumer] = relationship(back_populates="keys")

    def status(self, now: datetime) -> str:
        """``active``, ``revoked`` or ``expired`` at ``now`` (timezone-aware)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"
