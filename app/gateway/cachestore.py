"""Where cached responses live: Redis when configured, else a byte-bounded in-process LRU.

Both keep entries for their whole usable life (fresh plus the stale-if-error grace) and offer
a short lock per key, so that concurrent misses make one upstream call (single flight).
"""
from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import redis


@dataclass
class Entry:
    """A stored response: ``stored_at`` (epoch seconds) and ``fresh_for`` (seconds) give its age
    and whether it is still fresh; ``headers`` are ``(name, value)`` pairs."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    stored_at: float
    fresh_for: float
    digest: str = ""  # for a stored idempotent answer: the SHA-256 of the request it answered

    def encode(self) -> bytes:
        meta = {
            "status": self.status,
            "headers": self.headers,
            "stored_at": self.stored_at,
            "fresh_for": self.fresh_for,
            "digest": self.digest,
        }
        return json.dumps(meta).encode() + b"\n" + self.body

    def is_fresh(self, now: float) -> bool:
        """Whether its age at ``now`` (epoch seconds) is below its freshness lifetime (RFC 9111
        section 4.2)."""
        return now - self.stored_at < self.fresh_for

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        meta, _, body = data.partition(b"\n")
        fields = json.loads(meta)
        headers = [tuple(h) for h in fields["headers"]]
        return cls(fields["status"], headers, body, fields["stored_at"], fields["fresh_for"], fields.get("digest", ""))


class CacheStore(Protocol):
    def get(self, key: str, shared: bool = False) -> bytes | None: ...

    def get_many(self, keys: list[str], shared: bool = False) -> list[bytes | None]:
        """The values of ``keys``, in one round trip where the store has them. ``shared``: as
        the shared store has them now, not as a near copy kept in this process has them."""

    def set(self, key: str, value: bytes, ttl: float) -> bool:
        """Store ``value`` for ``ttl`` seconds; False when it was not kept (too large)."""

    def lock(self, key: str, ttl: float) -> bool:
        """Take the single-flight lock of ``key`` for at most ``ttl`` seconds; False if held."""

    def unlock(self, key: str) -> None: ...

    def delete(self, pattern: str) -> int:
        """Delete the keys matching the glob ``pattern``; return how many."""


class MemoryStore:
    """An LRU of at most ``max_bytes`` bytes of values, per process (the embedded default).

    Thread-safe for gthread workers: writes hold a mutex, reads do not (each OrderedDict
    operation they make is atomic under CPython's GIL)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._locks: dict[str, float] = {}
        self._mutex = threading.Lock()

    def get(self, key: str, shared: bool = False) -> bytes | None:
        # Without the mutex: OrderedDict's get and move_to_end are each atomic under the GIL,
        # and a hit is the hot path. With many request threads a lock here convoys (a thread
        # holding it is switched out and the others block on it): bench/README.md.
        found = self._entries.get(key)
        if found is None:
            return None
        value, expires = found
        if expires <= time.time():
            with self._mutex:
                if self._entries.get(key) is found:
                    self._drop(key)
            return None
        try:
            self._entries.move_to_end(key)
        except KeyError:  # dropped by another thread since: the value read is still the answer
            pass
        return value

    def get_many(self, keys: list[str], shared: bool = False) -> list[bytes | None]:
        return [self.get(key) for key in keys]

    def set(self, key: str, value: bytes, ttl: float) -> bool:
        if len(value) > self.max_bytes:
            return False
        with self._mutex:
            if key in self._entries:
                self._drop(key)
            self._entries[key] = (value, time.time() + ttl)
            self.size += len(value)
            while self.size > self.max_bytes:  # the least recently used go first
                _, (dropped, _) = self._entries.popitem(last=False)
                self.size -= len(dropped)
        return True

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self.size -= len(value)

    def discard(self, key: str) -> None:
        """Forget ``key``'s value, if there is one."""
        with self._mutex:
            if key in self._entries:
                self._drop(key)

    def lock(self, key: str, ttl: float) -> bool:
        now = time.monotonic()
        with self._mutex:
            if self._locks.get(key, 0.0) > now:
                return False
            self._locks[key] = now + ttl
            return True

    def unlock(self, key: str) -> None:
        with self._mutex:
            self._locks.pop(key, None)

    def delete(self, pattern: str) -> int:
        with self._mutex:
            # A snapshot of the keys (one C call): ``get`` reorders them without the mutex.
            doomed = [key for key in list(self._entries) if fnmatch.fnmatchcase(key, pattern)]
            for key in doomed:
                self._drop(key)
            return len(doomed)


class RedisStore:
    """Entries in Redis, shared by every gateway process; locks with ``SET NX PX``. Reads, one
    or two per cache lookup, go on the calling thread's own connection (``ThreadConnections``).

    With ``near`` (a MemoryStore) each value read or written is also kept in the process for
    ``near_ttl`` seconds, and read from there while it lasts: a near cache in front of the
    shared one, as Kong's mlcache keeps one in front of its database. A hit then makes no
    round trip (it cost a fifth of a cached answer's CPU under gunicorn, bench/README.md). The price: another
    process's purge or replacement of a value reaches this process within ``near_ttl``; a purge
    or write made here is seen here at once. A value not found is never kept, so what another
    process stores is found at once.
    """

    def __init__(self, client: redis.Redis, near: MemoryStore | None = None, near_ttl: float = 0.0):
        from app.gateway.direct import (
            ThreadConnections,  # here: redis stays out of the route file's imports
        )

        self.client = client
        self.reads = ThreadConnections(client)
        self.near = near if near_ttl > 0 else None
        self.near_ttl = near_ttl

    def get(self, key: str, shared: bool = False) -> bytes | None:
        return self.get_many([key], shared)[0]

    def get_many(self, keys: list[str], shared: bool = False) -> list[bytes | None]:
        near = self.near
        if near is None:
            return self.reads.execute("MGET", *keys)
        if not shared:
            values = near.get_many(keys)
            if None not in values:
                return values
        values = self.reads.execute("MGET", *keys)
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                near.set(key, value, self.near_ttl)
            else:
                near.discard(key)  # gone from Redis (purged elsewhere): not served from here again
        return values

    def set(self, key: str, value: bytes, ttl: float) -> bool:
        stored = bool(self.client.set(key, value, px=max(int(ttl * 1000), 1)))
        near = self.near
        if near is not None and not (stored and near.set(key, value, min(ttl, self.near_ttl))):
            near.discard(key)  # not kept here (not stored, or too large): no older copy either
        return stored

    def lock(self, key: str, ttl: float) -> bool:
        return bool(self.client.set(key + ":lock", b"1", nx=True, px=max(int(ttl * 1000), 1)))

    def unlock(self, key: str) -> None:
        self.client.delete(key + ":lock")

    def delete(self, pattern: str) -> int:
        deleted = 0
        batch = []
        for key in self.client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += self.client.delete(*batch)
                batch = []
        if batch:
            deleted += self.client.delete(*batch)
        if self.near is not None:
            self.near.delete(pattern)
        return deleted
