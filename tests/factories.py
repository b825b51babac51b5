"""Factories for rows the tests need: consumers and their API keys, in any app's database."""
from __future__ import annotations

import uuid

from flask import Flask

from app.auth import manage
from app.extensions import db
from app.models import Consumer


class Identity:
    """Create tables in ``app``'s database, then consumers and keys: ``identity.key("acme")``."""

    def __init__(self, app: Flask):
        self.app = app
        with app.app_context():
            db.create_all()

    def consumer(self, name: str | None = None, plan: str | None = None, disabled: bool = False) -> str:
        """Create a consumer and return its id."""
        with self.app.app_context():
            consumer = manage.create_consumer(name or f"c-{uuid.uuid4().hex[:8]}", plan)
            if disabled:
                manage.update_consumer(consumer, disabled=True)
            return consumer.id

    def key(self, consumer: str | None = None, scopes: tuple[str, ...] = (), expires_in: float | None = None) -> str:
        """Create a key for ``consumer`` (id or name; a new consumer when None) and return the key itself."""
        with self.app.app_context():
            row = manage.find_consumer(consumer or self.consumer())
            assert row is not None, consumer
            return manage.create_key(row, list(scopes), expires_in).key

    def consumer_row(self, reference: str) -> Consumer:
        with self.app.app_context():
            row = manage.find_consumer(reference)
            db.session.expunge(row)
            return row
