"""PostgreSQL stopped for 20 s under load: identity from what was verified before, for a bounded
time; 503 database-unavailable for whatever needs the database; never a 500; no restart after.

The gateway runs under gunicorn on a PostgreSQL cluster of this test's own (the shared server is
never stopped), with Redis for breakers, limits and the control record, as on Heroku. One
gunicorn worker: each process keeps its own cache of verified keys, and with one the test
knows which cache answered.
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Self

import pytest
import requests
from sqlalchemy.engine import make_url

from app.extensions import db
from tests import services
from tests.factories import Identity

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

OUTAGE = 20.0  # seconds PostgreSQL is stopped
TTL = 1.0  # GATEWAY_AUTH_CACHE_TTL
STALE = 10.0  # GATEWAY_AUTH_CACHE_STALE: shorter than the outage, so both sides of it are seen
MARGIN = 1.0  # seconds between two checks of the key before the stop, a request's own time included

ROUTES = """\
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 5.0}}
routes:
  - path: /private
    upstream: httpbin
    strip_prefix: true
    auth: required
  - path: /open
    upstream: httpbin
    strip_prefix: true
    auth: none
  - path: /async
    upstream: httpbin
    strip_prefix: true
    mode: async
    auth: optional
"""


class Cluster:
    """The PostgreSQL cluster ``services.throwaway_postgres`` started, stopped and started again
    on its port with pg_ctl, as the operator of a database does."""

    def __init__(self, url: str):
        import psycopg

        self.url = url
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as connection:
            self.data = connection.execute("SHOW data_directory").fetchone()[0]
        self.port = make_url(url).port
        self.pg_ctl = services._pg_bin("pg_ctl")
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def stop(self) -> None:
        """Fast shutdown: open connections are closed, new ones refused."""
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -h 127.0.0.1"
        self._pg_ctl("-l", f"{self.data}/log", "-o", options, "start")

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.data, "-w", *args], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class Answer:
    sent: float  # time.monotonic() when the request was sent
    at: float  # when its answer arrived
    kind: str
    status: int
    type: str | None  # the problem's type, for problem+json answers
    retry_after: str | None


class Load:
    """Threads sending one kind of request each, in a loop, until stopped; every answer kept."""

    def __init__(self, requests_by_kind: dict[str, tuple]):
        self.requests_by_kind = requests_by_kind
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True) for kind in requests_by_kind]

    def __enter__(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self, kind: str) -> None:
        method, url, kwargs = self.requests_by_kind[kind]
        with requests.Session() as session:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = session.request(method, url, timeout=10, **kwargs)
                except requests.RequestException as exc:
                    self.errors.append(f"{kind}: {exc}")
                    continue
                problem = response.json().get("type") if response.headers.get("Content-Type") == "application/problem+json" else None
                self.answers.append(Answer(sent, time.monotonic(), kind, response.status_code, problem, response.headers.get("Retry-After")))
                time.sleep(0.05)

    def of(self, kind: str, start: float = float("-inf"), end: float = float("inf")) -> list[Answer]:
        """The answers to ``kind`` requests sent at or after ``start`` and answered before ``end``."""
        return [a for a in self.answers if a.kind == kind and start <= a.sent and a.at < end]


@pytest.fixture
def cluster():
    with services.throwaway_postgres() as url:
        yield Cluster(url)


def a_key(make_app, database_url: str) -> str:
    """Make the tables in the cluster's database and a consumer's key; return the key."""
    app = make_app(SQLALCHEMY_DATABASE_URI=database_url)
    try:
        return Identity(app).key()
    finally:
        with app.app_context():
            db.engine.dispose()


def test_postgres_stopped_for_20_s_under_load(cluster, redis_url, key_prefix, httpbin_url, start_gateway, make_app):
    env = {
        "DATABASE_URL": cluster.url,
        "REDIS_URL": redis_url,
        "GATEWAY_KEY_PREFIX": key_prefix,
        "GATEWAY_AUTH_CACHE_TTL": str(TTL),
        "GATEWAY_AUTH_CACHE_STALE": str(STALE),
        "GATEWAY_WEBHOOK_SECRET_KEYS": "an-outage-test-passphrase-of-32-characters-or-more",
    }
    key = a_key(make_app, cluster.url)
    gateway = start_gateway(ROUTES.format(httpbin=httpbin_url), workers=1, **env)
    authed = {"headers": {"X-API-Key": key}}
    submitted = requests.post(f"{gateway.url}/async/anything", data=b"before", timeout=10)
    assert submitted.status_code == 202, submitted.text
    job = submitted.headers["Location"]
    assert job.startswith(gateway.url)  # this worktree's gateway: its status URL, on its host
    load = Load({
        "authenticated": ("GET", f"{gateway.url}/private/get", authed),
        "anonymous": ("GET", f"{gateway.url}/open/get", {}),
        "submit": ("POST", f"{gateway.url}/async/anything", {"data": b"x"}),
        "job": ("GET", job, {}),
        "keys api": ("GET", f"{gateway.url}/_gateway/keys", authed),
    })

    with load:
        time.sleep(2)
        stopping = time.monotonic()
        cluster.stop()
        stopped = time.monotonic()
        time.sleep(OUTAGE - (stopped - stopping))
        restarting = time.monotonic()
        cluster.start()
        started = time.monotonic()
        time.sleep(6)
    ended = time.monotonic()

    assert load.errors == []
    assert [a for a in load.answers if a.status == 500] == []
    # Before: everything answers.
    expected = {"authenticated": 200, "anonymous": 200, "submit": 202, "job": 200, "keys api": 200}
    for kind, status in expected.items():
        before = load.of(kind, end=stopping)
        assert before and {a.status for a in before} == {status}, (kind, before)
    # During: whatever fails is a 503 database-unavailable with Retry-After, nothing else.
    during = [a for a in load.answers if stopping <= a.at and a.sent < started and a.status != expected[a.kind]]
    assert during
    assert {(a.status, a.type, a.retry_after) for a in during} == {(503, "/_gateway/problems/database-unavailable", "5")}
    # Anonymous proxying needs no database; submissions and job reads do, from the first moment
    # the database is gone until it is back.
    assert {a.status for a in load.of("anonymous", stopping, started)} == {200}
    for kind in ("submit", "job", "keys api"):
        assert {a.status for a in load.of(kind, stopped, restarting)} == {503}, kind
    # Identity: the key verified before the stop (at most TTL before it) is served for STALE
    # seconds after that check, then refused with 503; never let in on a check older than STALE.
    authenticated = load.of("authenticated", stopped, restarting)
    let_in = [a for a in authenticated if a.status == 200]
    refused = [a for a in authenticated if a.status == 503]
    assert let_in and refused
    assert min(a.sent for a in let_in) < stopped + 1
    assert max(a.sent for a in let_in) < stopped + STALE
    assert min(a.at for a in refused) > stopping + STALE - TTL - MARGIN
    # Once past the window, refused until the database is back.
    assert max(a.sent for a in let_in) < min(a.sent for a in refused)
    # After: every kind recovers without a restart of the gateway, within a few seconds.
    recovered_by = started + 3
    for kind, status in expected.items():
        after = load.of(kind, recovered_by, ended)
        assert after and {a.status for a in after} == {status}, (kind, after)
    assert gateway.process.poll() is None
