"""What the identity tests share: routes for each auth mode and SQL changes behind the gateway's back."""
from __future__ import annotations

from requests.structures import CaseInsensitiveDict
from sqlalchemy import update

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
