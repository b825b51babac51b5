"""Fixtures for the delivery tests: an app with a compressed schedule, a receiver, a clock, what was enqueued."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from flask import Flask
from sqlalchemy import create_engine, select, text
from sqlalchemy.pool import NullPool

from app.extensions import db
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookMessage
from app.webhooks import attempts, deliveries, dispatch, endpoints, messages
from tests.factories import Identity
from tests.services import free_port

SECRET_KEY = "frontdoor-test-secret-key-of-forty-chars"  # a WEBHOOK_SECRET_KEYS passphrase (>= 32 characters)
SCHEDULE = [10, 20, 40]  # seconds between tries; the clock fixture moves time, so nothing sleeps

WEBHOOK_CONFIG = {
    "WEBHOOK_ALLOW_HTTP": True,
    "WEBHOOK_ALLOWED_NETWORKS": ["127.0.0.0/8"],
    "WEBHOOK_SECRET_KEYS": SECRET_KEY,
    "WEBHOOK_RETRY_SCHEDULE": SCHEDULE,
    "WEBHOOK_RETRY_JITTER": 0,
    "WEBHOOK_TIMEOUT": 2.0,
    "WEBHOOK_LEASE": 60.0,
    "WEBHOOK_REQUEUE_AFTER": 5.0,
    "WEBHOOK_ENDPOINT_CONCURRENCY": 4,
}


# -- the receiver ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One answer of the receiver: status, headers, body, and how long (seconds) it waits first."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request the receiver got: path, headers (names in lower case), body, and the
    client's address and port (one per connection)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    peer: tuple[str, int] = ("", 0)


class Receiver:
    """A webhook receiver on loopback: records every request and answers the replies queued
    with ``reply(...)`` in order, then ``default`` (200). Each answer closes its connection,
    unless ``keep_alive`` (HTTP/1.1: connections stay open for the next request).
    ``most_in_flight`` is the most requests it held at once. ``close()`` stops it (connections
    are refused)."""

    def __init__(self, keep_alive: bool = False, default: Reply | None = None):
        self.received: list[Received] = []
        self.script: collections.deque[Reply] = collections.deque()
        self.lock = threading.Lock()
        self.keep_alive, self.default = keep_alive, default or Reply()
        self.in_flight = self.most_in_flight = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_POST(self):
                owner.handle(self)

            do_GET = do_PUT = do_POST

            def log_message(self, format, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.closed = False

    def reply(self, *replies: Reply | int) -> None:
        with self.lock:
            self.script.extend(Reply(item) if isinstance(item, int) else item for item in replies)

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self.lock:
            self.received.append(Received(handler.command, handler.path, headers, body, handler.client_address))
            reply = self.script.popleft() if self.script else self.default
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if reply.delay:
                time.sleep(reply.delay)
            handler.send_response(reply.status)
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            if not self.keep_alive:
                handler.send_header("Connection", "close")
            handler.end_headers()
            handler.wfile.write(reply.body)
        finally:
            with self.lock:
                self.in_flight -= 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(5)


@pytest.fixture
def make_receiver():
    """``make_receiver(**options)``: a new Receiver, stopped after the test."""
    made: list[Receiver] = []

    def build(**options) -> Receiver:
        made.append(Receiver(**options))
        return made[-1]

    yield build
    for receiver in made:
        receiver.close()


@pytest.fixture
def receiver(make_receiver) -> Receiver:
    return make_receiver()


@pytest.fixture
def closed_url() -> str:
    """A loopback URL on a port where nothing listens: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}/hook"


# -- time and the queue --------------------------------------------------------------------------


class Clock:
    """The webhooks' ``utcnow``: real time plus an offset the test moves forward."""

    def __init__(self):
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    found = Clock()
    for module in (endpoints, messages, attempts, dispatch, deliveries):
        monkeypatch.setattr(module, "utcnow", found)
    return found


@dataclass
class Enqueued:
    """What was handed to Celery: deliver messages (``attempts.wake``: the delivery ids they
    name, and how many there were) and message ids (``messages.fan_out_later``), each checked,
    when handed over, to be committed already (read through a connection of its own)."""

    deliveries: list[str] = field(default_factory=list)
    wakes: int = 0
    messages: list[str] = field(default_factory=list)
    database_uri: str = ""

    def committed(self, table: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        engine = create_engine(self.database_uri, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                rows = connection.execute(text(f"SELECT id FROM {table}")).scalars()
                return set(rows) & set(ids)
        finally:
            engine.dispose()

    def wake(self, delivery_ids: list[str] | None = None) -> bool:
        delivery_ids = list(delivery_ids or ())
        missing = set(delivery_ids) - self.committed("webhook_deliveries", delivery_ids)
        assert not missing, f"deliveries enqueued before their rows were committed: {missing}"
        self.deliveries.extend(delivery_ids)
        self.wakes += 1
        return True

    def fan_out_later(self, message_ids: list[str]) -> None:
        missing = set(message_ids) - self.committed("webhook_messages", message_ids)
        assert not missing, f"messages enqueued before their rows were committed: {missing}"
        self.messages.extend(message_ids)

    def clear(self) -> None:
        self.deliveries.clear()
        self.messages.clear()
        self.wakes = 0


@pytest.fixture(autouse=True)
def fan_outs_start_afresh(monkeypatch):
    """What a process's last fan-out took (it decides whether the next one lingers) is not
    carried from one test to the next."""
    monkeypatch.setattr(messages, "_streaming", False)


@pytest.fixture
def enqueued(monkeypatch) -> Enqueued:
    found = Enqueued()
    monkeypatch.setattr(attempts, "wake", found.wake)
    monkeypatch.setattr(messages, "fan_out_later", found.fan_out_later)
    return found


# -- the database -------------------------------------------------------------------------------


@pytest.fixture
def database(request, tmp_path):
    """The app's database URI: SQLite under tmp_path, or with ``indirect`` param ``"postgres"``
    a PostgreSQL database of this test's own (as tests/integration/conftest.py makes them)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite'}"
        return
    yield request.getfixturevalue("postgres_database")


BOTH = pytest.mark.parametrize("database", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)


# -- the app and the domain calls ---------------------------------------------------------------


class Hooks:
    """An app with webhook tables, and the domain calls a worker makes, each in an app context
    of its own (as each Celery task runs). Rows come back detached, as read at the time."""

    def __init__(self, app: Flask):
        self.app = app
        self.identity = Identity(app)  # creates the tables

    def consumer(self) -> str:
        return self.identity.consumer()

    def endpoint(self, consumer_id: str, url: str, event_types: list[str] | tuple = (), disabled: bool = False) -> str:
        with self.app.app_context():
            endpoint, _ = endpoints.create(consumer_id, url, "", list(event_types), None, disabled)
            return endpoint.id

    def secret(self, endpoint_id: str) -> str:
        with self.app.app_context():
            endpoint = db.session.get(WebhookEndpoint, endpoint_id)
            return endpoints.signing_secrets(endpoint)[0]

    def message(self, consumer_id: str, event_type: str = "order.created", data: object = None) -> str:
        """Record a message (not fanned out) and return its id."""
        with self.app.app_context():
            message, _ = messages.record_message(consumer_id, event_type, {"n": 1} if data is None else data)
            return message.id

    def fan_out(self, message_id: str) -> list[str]:
        with self.app.app_context():
            return messages.fan_out(message_id)

    def publish(self, consumer_id: str, event_type: str = "order.created", data: object = None) -> list[str]:
        """Record a message and fan it out; return the new deliveries' ids."""
        return self.fan_out(self.message(consumer_id, event_type, data))

    def deliver(self, delivery_id: str) -> str | None:
        """One batch of the delivery ``delivery_id`` alone, as a worker makes it: ``"succeeded"``
        or ``"failed"`` (the attempt's outcome, whether or not a retry follows), or None when it
        was not claimed (not due, its endpoint at its cap or disabled)."""
        statuses = self.batch([delivery_id])
        if delivery_id not in statuses:
            return None
        return "succeeded" if statuses[delivery_id] == "succeeded" else "failed"

    def batch(self, delivery_ids: list[str] | None = None, limit: int = 50) -> dict[str, str]:
        """Claim up to ``limit`` due deliveries (among ``delivery_ids`` when given), send them at
        once and record them; return ``{delivery_id: new status}``."""
        with self.app.app_context():
            works = attempts.claim(limit, delivery_ids)
            return attempts.record(works, attempts.send_batch(works))

    def claim(self, delivery_id: str) -> attempts.Claim | None:
        with self.app.app_context():
            found = attempts.claim(1, [delivery_id])
            return found[0] if found else None

    def dispatch(self) -> dict[str, int]:
        with self.app.app_context():
            return dispatch.dispatch()

    def sweep(self) -> dict[str, int]:
        with self.app.app_context():
            return dispatch.sweep()

    def call(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` in an app context of its own."""
        with self.app.app_context():
            return function(*args, **kwargs)

    def _detached(self, rows):
        rows = list(rows)
        for row in rows:
            db.session.expunge(row)
        return rows

    def delivery(self, delivery_id: str) -> WebhookDelivery:
        with self.app.app_context():
            row = db.session.get(WebhookDelivery, delivery_id)
            assert row is not None, delivery_id
            return self._detached([row])[0]

    def deliveries(self, message_id: str | None = None) -> list[WebhookDelivery]:
        with self.app.app_context():
            query = select(WebhookDelivery).order_by(WebhookDelivery.created_at, WebhookDelivery.id)
            if message_id is not None:
                query = query.where(WebhookDelivery.message_id == message_id)
            return self._detached(db.session.execute(query).scalars())

    def attempts(self, delivery_id: str | None = None) -> list[WebhookAttempt]:
        with self.app.app_context():
            query = select(WebhookAttempt).order_by(WebhookAttempt.created_at, WebhookAttempt.number)
            if delivery_id is not None:
                query = query.where(WebhookAttempt.delivery_id == delivery_id)
            return self._detached(db.session.execute(query).scalars())

    def endpoint_row(self, endpoint_id: str) -> WebhookEndpoint:
        with self.app.app_context():
            row = db.session.get(WebhookEndpoint, endpoint_id)
            assert row is not None, endpoint_id
            return self._detached([row])[0]

    def messages(self, event_type: str | None = None) -> list[dict]:
        """Every message as ``{"id", "consumer_id", "event_id", "type", "data", "fanned_out"}``, oldest first."""
        with self.app.app_context():
            query = select(WebhookMessage).order_by(WebhookMessage.created_at, WebhookMessage.id)
            if event_type is not None:
                query = query.where(WebhookMessage.type == event_type)
            return [
                {
                    "id": row.id,
                    "consumer_id": row.consumer_id,
                    "event_id": row.event_id,
                    "type": row.type,
                    "data": row.data,
                    "fanned_out": row.fanned_out_at is not None,
                }
                for row in db.session.execute(query).scalars()
            ]

    def dispose(self) -> None:
        with self.app.app_context():
            db.session.remove()
            for engine in db.engines.values():
                engine.dispose()


@pytest.fixture
def make_hooks(make_app, database, enqueued, clock):
    """``make_hooks(**config)``: a Hooks over an app with WEBHOOK_CONFIG (and ``config``) on
    the test's database, the enqueue recorded (``enqueued``) and time on ``clock``."""
    made: list[Hooks] = []

    def build(**config) -> Hooks:
        settings = {**WEBHOOK_CONFIG, "SQLALCHEMY_DATABASE_URI": database, **config}
        enqueued.database_uri = database.replace("postgresql://", "postgresql+psycopg://", 1)
        made.append(Hooks(make_app(**settings)))
        return made[-1]

    yield build
    for hooks in made:
        hooks.dispose()


@pytest.fixture
def hooks(make_hooks) -> Hooks:
    return make_hooks()
