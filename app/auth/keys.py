"""API keys: minting, hashing, and a verified-key cache so the request path skips the database."""
from __future__ import annotations

import hashlib
import logging
import secrets
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cachetools import LRUCache, TTLCache
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.errors import DatabaseUnavailable
from app.models import ApiKey, Consumer
from app.models.base import utcnow

log = logging.getLogger("frontdoor.auth")

KEY_PREFIX = "fd_live_"
_ALPHABET = string.ascii_letters + string.digits
_LOOKUP_LENGTH = 8  # characters shown in listings after KEY_PREFIX: fd_live_ab12cd34
_SECRET_LENGTH = 32  # base62: about 190 bits
# last_used_at is written when a key is looked up after its cache entry lapsed, and at most
# this often (seconds): it says "used recently", not "used at this very instant".
LAST_USED_GRANULARITY = 60.0


def _random(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def hash_key(key: str) -> str:
    """The SHA-256 hex digest under which a key is stored and looked up."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class MintedKey:
    """A new key: the row to store and the only copy of the key itself."""

    row: ApiKey
    key: str


def mint(consumer: Consumer, scopes: list[str], expires_at: datetime | None = None, rotated_from: str | None = None) -> MintedKey:
    """Create (not yet committed) a key for ``consumer``: ``fd_live_`` + 8 + 32 base62 characters."""
    lookup = _random(_LOOKUP_LENGTH)
    key = f"{KEY_PREFIX}{lookup}{_random(_SECRET_LENGTH)}"
    row = ApiKey(
        consumer=consumer,
        prefix=f"{KEY_PREFIX}{lookup}",
        secret_hash=hash_key(key),
        scopes=sorted(set(scopes)),
        expires_at=expires_at,
        rotated_from=rotated_from,
        created_at=utcnow(),
    )
    return MintedKey(row, key)


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the request path needs of a key and its consumer, as read from the database."""

    key_id: str
    consumer_id: str
    consumer_name: str
    plan: str | None
    scopes: frozenset[str]
    expires_at: float | None  # epoch seconds
    usable: bool  # neither revoked nor the consumer disabled

    def valid_at(self, now: float) -> bool:
        return self.usable and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True, slots=True)
class _Entry:
    value: object
    verified_at: float  # time.monotonic() when the read that found it began


class CachedLookup:
    """Values read from the database, kept in-process: fresh for ``ttl`` seconds, then read again.

    A fresh hit costs no query. A change in the database (a revoked key, a disabled consumer,
    a new plan) is therefore seen by every process within ``ttl`` seconds while the database
    answers. Misses are cached too (for ``ttl``), so a client repeating an unknown key does
    not query the database on each request.

    While the database cannot be reached (``load`` raises DatabaseUnavailable) a value read
    up to ``stale`` seconds ago is served instead, as Kong serves cached credentials and
    nginx a stale answer (``proxy_cache_use_stale``); an older one, or a miss, re-raises the
    503. After such a failure the database is not asked again for ``holdoff`` seconds, so
    that a database that does not answer at all costs one connect timeout per process and
    ``holdoff``, not one per request. Times are seconds.
    """

    def __init__(self, ttl: float, maxsize: int, stale: float = 0.0, holdoff: float = 1.0):
        self.ttl = ttl
        self.stale = max(stale, ttl)
        self.holdoff = holdoff
        self._entries: LRUCache = LRUCache(maxsize=maxsize)
        # Misses apart: a flood of made-up keys evicts other made-up keys, never real ones.
        self._misses: TTLCache = TTLCache(maxsize=maxsize, ttl=ttl, timer=time.monotonic)
        self._lock = threading.Lock()
        self._generation = 0  # bumped by forget(): a load that began before it is not stored
        self._outage: DatabaseUnavailable | None = None  # the last failure, while held off
        self._retry_at = float("-inf")

    def get(self, name: str, load: Callable[[], object]) -> object:
        """Return the value cached under ``name``, calling ``load()`` when it is not fresh.

        Raises DatabaseUnavailable when ``load`` does (or did within ``holdoff``) and no value
        read within ``stale`` is kept; whatever else ``load`` raises propagates. Nothing is
        cached from a failed load.
        """
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and now - entry.verified_at < self.ttl:
                return entry.value
            if entry is None and name in self._misses:
                return None
            generation = self._generation
            outage = self._outage if now < self._retry_at else None
        if outage is not None:
            return self._stale(entry, now, DatabaseUnavailable(outage.detail, headers=dict(outage.headers)))
        try:
            value = load()  # outside the lock: one slow query must not hold up every other request
        except DatabaseUnavailable as error:
            with self._lock:
                self._outage, self._retry_at = error, time.monotonic() + self.holdoff
            return self._stale(entry, now, error)
        with self._lock:
            if generation == self._generation:  # else a revocation came in while loading
                if value is None:
                    self._entries.pop(name, None)
                    self._misses[name] = True
                else:
                    self._entries[name] = _Entry(value, now)
                    self._misses.pop(name, None)
        return value

    def _stale(self, entry: _Entry | None, now: float, error: DatabaseUnavailable) -> object:
        if entry is not None and now - entry.verified_at < self.stale:
            return entry.value
        raise error

    def forget(self, name: str | None = None) -> None:
        """Drop one entry, or all: this process sees a change at once, the others within ``ttl``."""
        with self._lock:
            self._generation += 1
            if name is None:
                self._entries.clear()
                self._misses.clear()
            else:
                self._entries.pop(name, None)
                self._misses.pop(name, None)


def read_key(digest: str, session: Session) -> KeyRecord | None:
    """Read the key stored under ``digest`` with its consumer; None when there is none.

    Marks the key used, at most every LAST_USED_GRANULARITY seconds and on a best-effort
    basis: a failed write is logged, not an authentication failure. A failed read raises
    SQLAlchemy's error (the caller translates it: ``app.errors.database_errors``).
    """
    row = session.execute(select(ApiKey, Consumer).join(Consumer).where(ApiKey.secret_hash == digest)).first()
    if row is None:
        return None
    key, consumer = row
    record = KeyRecord(
        key_id=key.id,
        consumer_id=consumer.id,
        consumer_name=consumer.name,
        plan=consumer.plan,
        scopes=frozenset(key.scopes or ()),
        expires_at=key.expires_at.timestamp() if key.expires_at else None,
        usable=key.revoked_at is None and not consumer.disabled,
    )
    now = utcnow()
    # Only a key that lets the caller in is "used": a revoked or expired one gets no write,
    # which would also make its answer measurably slower than an unknown key's.
    if record.valid_at(now.timestamp()) and (
        key.last_used_at is None or key.last_used_at < now - timedelta(seconds=LAST_USED_GRANULARITY)
    ):
        try:
            session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=now))
            session.commit()
        except SQLAlchemyError:
            session.rollback()
            log.warning("could not record the use of a key", extra={"key_id": key.id}, exc_info=True)
    return record


@dataclass(frozen=True, slots=True)
class ConsumerRecord:
    consumer_id: str
    consumer_name: str
    plan: str | None
    usable: bool  # not disabled


def read_consumer(reference: str, session: Session) -> ConsumerRecord | None:
    """The consumer whose id or name is ``reference`` (a JWT ``sub``); None when there is none.

    A failed read raises SQLAlchemy's error, as ``read_key`` does.
    """
    consumer = session.execute(
        select(Consumer).where((Consumer.id == reference) | (Consumer.name == reference))
    ).scalar()
    if consumer is None:
        return None
    return ConsumerRecord(consumer.id, consumer.name, consumer.plan, not consumer.disabled)
