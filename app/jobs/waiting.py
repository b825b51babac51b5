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
    def wait(self, seconds: float) -> None:
        """Return when the job's end may have been announced, or after at most ``seconds``."""


class JobEnds(Protocol):
    """Where workers announce a job's end and requests wait for it."""

    def announce(self, job_id: str, status: str) -> None:
        """Tell whoever waits on ``job_id`` that it has ended with ``status``; call after the
        commit that made it final. Never raises: a lost announcement costs a waiter its wait."""

    def listen(self, job_id: str) -> AbstractContextManager[Listener]:
        """A context manager giving a Listener for ``job_id``'s end: an announcement made
        after it is entered wakes the listener."""


class RedisJobEnds:
    """Announcements published on a Redis channel per job; a listener subscribes to it (its own
    connection, closed when the wait ends) and blocks on the socket."""

    def __init__(self, client: redis.Redis, key_prefix: str):
        self.client = client
        self.prefix = f"{key_prefix}:jobs:ended:"

    def announce(self, job_id: str, status: str) -> None:
        try:
            self.client.publish(self.prefix + job_id, status)
        except redis.RedisError:
            log.warning("job end not announced; waiters read it when their wait ends", extra={"job_id": job_id}, exc_info=True)

    @contextmanager
    def listen(self, job_id: str) -> Iterator[Listener]:
        pubsub = self.client.pubsub()
        try:
            try:
                pubsub.subscribe(self.prefix + job_id)
                # Subscribed before the job is read: an end announced after that read wakes us.
                deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
                while True:
                    message = pubsub.get_message(timeout=max(deadline - time.monotonic(), 0.0))
                    if message is not None and message["type"] == "subscribe":
                        break
                    if time.monotonic() >= deadline:
                        raise redis.TimeoutError("no subscription confirmed")
            except redis.RedisError:
                log.warning("cannot wait on Redis for a job's end; polling instead", extra={"job_id": job_id}, exc_info=True)
                yield _Polling()
                return
            yield _Subscribed(pubsub)
        finally:
            pubsub.close()


class _Subscribed:
    def __init__(self, pubsub: redis.client.PubSub):
        self.pubsub = pubsub
        self.fallback: _Polling | None = None

    def wait(self, seconds: float) -> None:
        if self.fallback is not None:
            return self.fallback.wait(seconds)
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = self.pubsub.get_message(timeout=left)
                if message is not None and message["type"] == "message":
                    return None
        except redis.RedisError:
            # The subscription is gone: an announcement may have been missed, so read the job
            # now, and poll for the rest of the wait.
            log.warning("lost the Redis subscription of a job wait; polling instead", exc_info=True)
            self.fallback = _Polling()
        return None


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

    def wait(self, seconds: float) -> None:
        time.sleep(max(min(self.pause, seconds), 0.0))
        self.pause = min(self.pause * 2, POLL_MAX)


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

    ``read`` reads the job (and raises when it cannot be shown: 404, 410); it is called once
    after the listener is in place, then once each time the listener wakes. The database
    session is closed (its connection back in the pool) before each wait, so a waiting request
    holds a thread, and with Redis a Redis connection, but no database connection.
    """
    with job_ends().listen(job_id) as listener:
        job = read()
        deadline = time.monotonic() + seconds
        while not job.final and (left := deadline - time.monotonic()) > 0:
            db.session.close()
            listener.wait(left)
            job = read()
    return job
