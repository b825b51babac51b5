"""What every model shares: prefixed unguessable ids and timezone-aware UTC timestamps."""
from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import TypeVar

from sqlalchemy import DateTime
from sqlalchemy.orm import configure_mappers
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlalchemy.types import TypeDecorator

from app.extensions import naive_utc

Model = TypeVar("Model")


def written(model: type[Model], values: dict) -> Model:
    """An instance of ``model`` holding ``values``, a row just inserted, to be read (never added
    to a session: it is transient). Made without the per-attribute events ``model(**values)``
    runs (about 30 µs for a job's 25 columns, on every submission); columns not in ``values``
    read None."""
    configure_mappers()  # what model(...) would do first: a no-op once the mappers are set up
    instance = manager_of_class(model).new_instance()
    instance.__dict__.update(values)
    return instance


def new_id(prefix: str) -> str:
    """Return ``{prefix}_`` and 22 URL-safe random characters (128 bits): ``con_3hX...``.

    Unguessable, so an id seen in a log or a URL grants nothing by itself.
    """
    return f"{prefix}_{secrets.token_urlsafe(16)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as naive UTC and read back timezone-aware (UTC).

    SQLite has no time zones and returns naive datetimes even for ``DateTime(timezone=True)``;
    storing UTC everywhere and attaching the zone on the way out behaves the same on both.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass a timezone-aware one")
        return naive_utc(value)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def isoformat(value: datetime | None) -> str | None:
    """RFC 3339 with a ``Z``, to the second's millisecond, or None."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
