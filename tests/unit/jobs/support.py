"""Helpers for the job tests: a real upstream on loopback, the route file, and row access."""
from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from flask import Flask
from httpbin import app as httpbin_app
from sqlalchemy import func, select, update
from werkzeug.serving import make_server

from app.extensions import db
from app.jobs import worker
from app.models import Job, JobEvent, JobItem
from app.models.base import utcnow
from tests.services import free_port

PREFIX = "/_gateway/jobs"


@dataclass
class Upstream:
    """httpbin served by a threaded werkzeug server on loopback, with two additions:

    every request is recorded in ``seen`` as ``(method, path)`` and in ``targets`` as the
    request target it came with, still percent-encoded (``peak`` is the most requests
    it held at once), and a request to ``/gate/...`` signals ``entered`` and is held until
    ``gate`` is set (a slow upstream the test controls).
    """

    url: str = ""
    seen: list[tuple[str, str]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    lock: threading.Lock = field(default_factory=threading.Lock)
    in_flight: int = 0
    peak: int = 0

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        with self.lock:
            self.seen.append((environ["REQUEST_METHOD"], path))
            self.targets.append(environ.get("REQUEST_URI", ""))
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            if path.startswith("/gate"):
                self.entered.release()
                released = self.gate.wait(timeout=10)
                start_response("200 OK" if released else "500 Internal Server Error", [("Content-Type", "text/plain")])
                return [b"released" if released else b"never released"]
            return httpbin_app(environ, start_response)
        finally:
            with self.lock:
                self.in_flight -= 1

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()
            self.targets.clear()
            self.peak = 0
        self.gate.clear()
        self.entered = threading.Semaphore(0)

    def hits(self, path: str) -> int:
        with self.lock:
            return sum(1 for _, seen in self.seen if seen == path)

    def wait_entered(self, timeout: float = 5.0) -> None:
        if not self.entered.acquire(timeout=timeout):
            raise AssertionError("the upstream never received the request")


@functools.cache
def upstream_server() -> Upstream:
    """The process's one upstream server, started on first use (a daemon thread)."""
    upstream = Upstream()
    server = make_server("127.0.0.1", 0, upstream, threaded=True)
    upstream.url = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, name="test-upstream", daemon=True).start()
    return upstream


def routes(upstream_url: str, closed_port: int | None = None) -> str:
    """The route file of the job tests.

    - ``/async/...`` (mode async, auth optional) and ``/reports/...`` (mode async, auth
      required, scope ``reports``) send the rest of the path to httpbin;
    - ``/sync/...`` is an ordinary route to httpbin, ``/post`` (named ``small``) takes only POST
      with bodies up to 10 bytes, ``/open/...`` has ``auth: none``;
    - ``/public/...`` is async with ``auth: none``; ``/limited/...`` allows 2 calls a minute;
    - ``/slow/...`` is async on an upstream whose ``timeout.read`` is 1 s but ``job_timeout.read`` 5 s;
    - ``/dead/...`` is async on an upstream nothing listens on.
    """
    closed = closed_port or free_port()
    return f"""
upstreams:
  bin:
    targets: ["{upstream_url}"]
    timeout: {{connect: 1.0, read: 5.0}}
  slow:
    targets: ["{upstream_url}"]
    timeout: {{connect: 1.0, read: 1.0}}
    job_timeout: {{connect: 1.0, read: 5.0}}
  dead:
    targets: ["http://127.0.0.1:{closed}"]
    timeout: {{connect: 0.5, read: 1.0}}
    job_timeout: {{connect: 0.5, read: 1.0}}
routes:
  - path: /async
    name: async
    upstream: bin
    strip_prefix: true
    mode: async
    allow_ambiguous_paths: true  # the tests send an encoded '/' through, to see it kept
  - path: /reports
    name: reports
    upstream: bin
    strip_prefix: true
    mode: async
    auth: required
    scopes: [reports]
  - path: /sync
    name: sync
    upstream: bin
    strip_prefix: true
    allow_ambiguous_paths: true
  - path: /open
    name: open
    upstream: bin
    strip_prefix: true
    auth: none
  - path: /post
    name: small
    upstream: bin
    methods: [POST]
    max_body_size: 10
  - path: /public
    name: public
    upstream: bin
    strip_prefix: true
    mode: async
    auth: none
  - path: /limited
    name: limited
    upstream: bin
    strip_prefix: true
    rate_limit: "2/minute"
  - path: /slow
    name: slow
    upstream: slow
    strip_prefix: true
    mode: async
  - path: /dead
    name: dead
    upstream: dead
    strip_prefix: true
    mode: async
"""


def _detached(row):
    """``row`` with every column loaded (deferred ones too), detached from its session."""
    for column in row.__table__.columns:
        getattr(row, column.key)
    db.session.expunge(row)
    return row


def job_row(app: Flask, job_id: str) -> Job | None:
    """The job's row as it is now (detached, every column loaded), or None when it is gone."""
    with app.app_context():
        job = db.session.get(Job, job_id)
        return None if job is None else _detached(job)


def item_rows(app: Flask, job_id: str) -> list[JobItem]:
    with app.app_context():
        rows = db.session.execute(select(JobItem).where(JobItem.job_id == job_id).order_by(JobItem.position)).scalars()
        return [_detached(row) for row in rows]


def events(app: Flask, job_id: str | None = None) -> list[JobEvent]:
    with app.app_context():
        query = select(JobEvent).order_by(JobEvent.created_at)
        if job_id is not None:
            query = query.where(JobEvent.job_id == job_id)
        return [_detached(row) for row in db.session.execute(query).scalars()]


def job_count(app: Flask) -> int:
    with app.app_context():
        return db.session.execute(select(func.count()).select_from(Job)).scalar_one()


def set_job(app: Flask, job_id: str, **values: object) -> None:
    """Write columns of a job row directly (to move its clock, or stage a worker's state)."""
    with app.app_context():
        db.session.execute(update(Job).where(Job.id == job_id).values(**values))
        db.session.commit()


def set_item(app: Flask, job_id: str, position: int, **values: object) -> None:
    """Write columns of one batch item directly."""
    with app.app_context():
        db.session.execute(update(JobItem).where(JobItem.job_id == job_id, JobItem.position == position).values(**values))
        db.session.commit()


def ago(seconds: float):
    return utcnow() - timedelta(seconds=seconds)


def later(seconds: float):
    return utcnow() + timedelta(seconds=seconds)


def run(app: Flask, job_id: str) -> str | None:
    """Run the job in this process, as the Celery task would."""
    with app.app_context():
        return worker.run(job_id)


class Background:
    """``worker.run(job_id)`` in a thread of its own, as a Celery worker process would run it."""

    def __init__(self, app, job_id: str):
        self.result: list[object] = []

        def target() -> None:
            try:
                self.result.append(run(app, job_id))
            except BaseException as exc:  # noqa: BLE001 - raised again by join()
                self.result.append(exc)

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 15.0) -> object:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the worker did not finish"
        (outcome,) = self.result
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def sweep(app: Flask) -> dict[str, int]:
    with app.app_context():
        return worker.sweep()


def submit(client, request: dict, headers: dict[str, str] | None = None, **extra: object):
    """POST a one-request job to /_gateway/jobs."""
    return client.post(PREFIX, json={"kind": "request", "request": request, **extra}, headers=headers or {})


def submit_batch(client, requests: list[dict], headers: dict[str, str] | None = None):
    return client.post(PREFIX, json={"kind": "batch", "requests": requests}, headers=headers or {})
