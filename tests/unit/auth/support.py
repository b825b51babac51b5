"""What the identity tests share: routes for each auth mode, SQL changes behind the gateway's
back, a database that goes away, and a clock that moves when told."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from requests.structures import CaseInsensitiveDict
from sqlalchemy import update
from sqlalchemy.engine import make_url

from app.auth.keys import hash_key
from app.extensions import db
from app.models import ApiKey

UPSTREAM = "http://upstream.test"
ROUTES = f"""
upstreams:
  backend:
    targets: ["{UPSTREAM}"]
routes:
  - path: /private
    upstream: backend
    auth: required
  - path: /orders
    upstream: backend
    auth: required
    scopes: [orders:read]
  - path: /maybe
    upstream: backend
    auth: optional
  - path: /open
    upstream: backend
    auth: none
  - path: /passthrough
    upstream: backend
    auth: required
    forward_credentials: true
"""


def received(upstream) -> CaseInsensitiveDict:
    """The headers of the last request the mocked upstream received."""
    assert len(upstream.calls) > 0, "the upstream was not called"
    return upstream.calls[-1].request.headers


def change_key(app, key: str, **values: object) -> None:
    """Update the key's row with SQL, as another process or an operator would: no cache is told."""
    with app.app_context():
        db.session.execute(update(ApiKey).where(ApiKey.secret_hash == hash_key(key)).values(**values))
        db.session.commit()


def key_id(client, key: str) -> str:
    """The id of ``key``, as its own consumer sees it in GET /_gateway/keys."""
    response = client.get("/_gateway/keys", headers={"X-API-Key": key})
    assert response.status_code == 200, response.json
    [row] = [row for row in response.json["data"] if key.startswith(row["prefix"])]
    return row["id"]


@contextmanager
def database_down(app) -> Iterator[None]:
    """Make ``app``'s SQLite database unreachable while the block runs, as a stopped server is:
    its pooled connections are closed and every new one fails ("unable to open database file",
    an OperationalError), until the file is put back."""
    path = Path(make_url(app.config["SQLALCHEMY_DATABASE_URI"]).database)
    with app.app_context():
        db.engine.dispose()
    away = path.with_name(path.name + ".away")
    path.rename(away)
    path.mkdir()  # a directory where the file was: SQLite cannot open it, nor create a new file
    try:
        yield
    finally:
        path.rmdir()
        away.rename(path)


class Clock:
    """A monotonic clock that moves only when told (``advance``), or by ``step`` on every reading."""

    def __init__(self, step: float = 0.0):
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        reading = self.now
        self.now += self.step
        return reading

    def advance(self, seconds: float) -> None:
        self.now += seconds
