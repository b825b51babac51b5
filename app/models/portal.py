"""Sessions of the portal's web pages: who signed in, with which credential, until when."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from app.extensions import db
from app.models.base import UTCDateTime, utcnow


class PortalSession(db.Model):
    """A signed-in browser. ``id`` is SHA-256 (hex) of the cookie's token, which is never stored;
    ``credential_id`` the API key it signed in with (``key_…``) or ``jwt``; ``scopes`` what that
    credential allowed (a key's are read again on every request); ``csrf_token`` the token its
    forms carry. It ends at ``expires_at``, at sign-out, or when its credential stops working."""

    __tablename__ = "portal_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    consumer_id: Mapped[str] = mapped_column(ForeignKey("consumers.id", ondelete="CASCADE"), index=True)
    credential_id: Mapped[str] = mapped_column(String(40))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
