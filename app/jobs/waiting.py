"""Waiting for a job to end (AIP-151's WaitOperation): the worker announces each final commit, and
a request waiting on the job wakes on it, holding no database connection meanwhile.

Two forms side by side, as the rest of the gateway's Redis-or-not services: with Redis
(``REDIS_URL``) the end is published on a channel of the job's own,
``{KEY_PREFIX}:jobs:ended:{job_id}``, and a waiting request blocks on its subscription; on the
embedded default (no Redis) nothing is announced, and a waiting request reads the job again
after 50 ms, then twice as long each time up to 1 s, its database connection back in the pool
in between.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol

import redis
from flask import Flask, current_app

from app.extensions import db, redis_client
from app.models import Job

log = logging.getLogger("frontdoor.jobs")

# Polling without Redis: the first look after this many seconds, then twice as long each time.
POLL_FIRST = 0.05
POLL_MAX = 1.0
# Seconds to wait for Redis to confirm a subscription before the job is read.
SUBSCRIBE_TIMEOUT = 1.0


class Listener(Protocol):
    def wait(self, seconds: float) -> bool:
        """Return when the job's end may have been announced, or after at most ``seconds``:
        True when its end was announced, False otherwise (polling never knows)."""


class JobEnds(Protocol):
    """Where workers announce a job's end and requests wait for it."""

    def announce(self, job_id: str, status: str) -> None:
        """Tell whoever waits on ``job_id`` that it has ended with ``status``; call after the
        commit that made it final. Never raises: a lost announcement costs a waiter its wait."""

    def listen(self, job_id: str) -> AbstractContextManager[Listener]:
        """A context manager giving a Listener for ``job_id``'s end: an announcement made
        after it is entered wakes the listener."""


class RedisJobEnds:
    """Announcements published on a Redis channel per job; a listener subscribes to it and
    blocks on the socket. Each thread keeps one subscription connection for its waits (a web
    thread waits on one job at a time), unsubscribed between them."""

    def __init__(self, client: redis.Redis, key_prefix: str):
        self.client = client
        self.prefix = f"{key_prefix}:jobs:ended:"
        self._local = threading.local()

    def announce(self, job_id: str, status: str) -> None:
        try:
            self.client.publish(self.prefix + job_id, status)
        except redis.RedisError:
            log.warning("job end not announced; waiters read it when their wait ends", extra={"job_id": job_id}, exc_info=True)

    @contextmanager
    def listen(self, job_id: str) -> Iterator[Listener]:
        channel = self.prefix + job_id
        pubsub = self._subscribed(channel)
        if pubsub is None:
            yield _Polling()
            return
        try:
            yield _Subscribed(pubsub, channel)
        finally:
            try:
                pubsub.unsubscribe(channel)  # its confirmation is read (and skipped) by the next wait
            except redis.RedisError:
                self.close()

    def _subscribed(self, channel: str) -> redis.client.PubSub | None:
        """This thread's subscription connection, subscribed to ``channel`` (confirmed by Redis,
        so that an announcement after this returns reaches it); a new connection if the kept one
        fails. None, logged, when Redis cannot be reached: the wait then polls."""
        for attempt in (1, 2):
            pubsub = getattr(self._local, "pubsub", None)
            if pubsub is None:
                pubsub = self._local.pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(channel)
                deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
                while (left := deadline - time.monotonic()) > 0:
                    message = pubsub.get_message(timeout=left)
                    if message is not None and message["type"] == "subscribe" and _name(message) == channel:
                        return pubsub
                raise redis.TimeoutError("Redis did not confirm the subscription")
            except redis.RedisError:
                self.close()
                if attempt == 2:
                    log.warning("cannot wait on Redis for a job's end; polling instead", extra={"channel": channel}, exc_info=True)
        return None

    def close(self) -> None:
        """Close this thread's subscription connection (the next wait opens another)."""
        pubsub = getattr(self._local, "pubsub", None)
        self._local.pubsub = None
        if pubsub is not None:
            try:
                pubsub.close()
            except redis.RedisError:
                pass


def _name(message: dict) -> str:
    channel = message["channel"]
    return channel.decode() if isinstance(channel, bytes) else channel


class _Subscribed:
    def __init__(self, pubsub: redis.client.PubSub, channel: str):
        self.pubsub, self.channel = pubsub, channel
        self.fallback: _Polling | None = None

    def wait(self, seconds: float) -> bool:
        if self.fallback is not None:
            return self.fallback.wait(seconds)
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = self.pubsub.get_message(timeout=left)
                # Skip what an earlier wait of this thread left: its unsubscribe, a late end.
                if message is not None and message["type"] == "message" and _name(message) == self.channel:
                    return True
        except redis.RedisError:
            # The subscription is gone: an announcement may have been missed, so read the job
            # now, and poll for the rest of the wait.
            log.warning("lost the Redis subscription of a job wait; polling instead", exc_info=True)
            self.fallback = _Polling()
        return False


class PolledJobEnds:
    """No announcements (no Redis): a listener sleeps, with a back-off, between reads."""

    def announce(self, job_id: str, status: str) -> None:
        return None

    @contextmanager
    def listen(self, job_id: str) -> Iterator[Listener]:
        yield _Polling()


class _Polling:
    def __init__(self) -> None:
        self.pause = POLL_FIRST

    def wait(self, seconds: float) -> bool:
        time.sleep(max(min(self.pause, seconds), 0.0))
        self.pause = min(self.pause * 2, POLL_MAX)
        return False


def init_app(app: Flask) -> None:
    client = redis_client(app)
    app.extensions["job_ends"] = RedisJobEnds(client, app.config["KEY_PREFIX"]) if client is not None else PolledJobEnds()


def job_ends() -> JobEnds:
    """The current app's JobEnds."""
    return current_app.extensions["job_ends"]


def announce(job_id: str, status: str) -> None:
    """Wake the requests waiting on ``job_id``: call after the commit that made it final."""
    job_ends().announce(job_id, status)


def wait_for_end(job_id: str, seconds: float, read: Callable[[], Job]) -> Job:
    """The job as ``read()`` gives it once it is final, or after ``seconds`` when it is not.

    ``read`` reads the job (and raises when it cannot be shown: 404, 410). A job already final
    is answered from the first read. Otherwise the listener is put in place and the job read
    again (it may have ended in between), then once each time the listener wakes. The database
    session is closed (its connection back in the pool) before each wait, so a waiting request
    holds a thread, and with Redis a Redis connection, but no database connection.
    """
    job = read()
    if job.final or seconds <= 0:
        return job
    deadline = time.monotonic() + seconds
    db.session.close()  # each read after this one reads the row, not the session's copy of it
    with job_ends().listen(job_id) as listener:
        job = read()
        while not job.final and (left := deadline - time.monotonic()) > 0:
            db.session.close()
            listener.wait(left)
            job = read()
    return job
