"""The gateway's API under gunicorn refuses oversized JSON bodies before reading them: 20 bodies
of 30 MB are 413 problems and the worker's memory stays within 50 MiB of where it started."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from app import create_app
from tests.factories import Identity

pytestmark = pytest.mark.slow

ROUTES = """\
upstreams:
  closed:
    targets: ["http://127.0.0.1:9"]
routes:
  - path: /async
    upstream: closed
    mode: async
"""
BODY = 30 * 1000 * 1000  # bytes, three times MAX_BODY_SIZE and thirty times API_MAX_BODY_SIZE
MiB = 1024 * 1024
ENDPOINTS = ["/_gateway/consumers", "/_gateway/keys", "/_gateway/events", "/_gateway/webhooks/endpoints", "/_gateway/jobs"]


def rss(pid: int) -> int:
    """The resident set size of ``pid`` in bytes (proc(5), VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def chunks(size: int, piece: int = 1024 * 1024):
    """``size`` bytes of a JSON string's inside, in pieces: requests sends them chunked."""
    sent = 0
    while sent < size:
        step = min(piece, size - sent)
        sent += step
        yield b"x" * step


def test_oversized_bodies_are_refused_unread_and_the_worker_keeps_its_memory(tmp_path, start_gateway):
    database = f"sqlite:///{tmp_path / 'gateway.sqlite'}"
    secret_key = Fernet.generate_key().decode()
    route_file = tmp_path / "gateway.yaml"
    route_file.write_text(ROUTES)
    app = create_app({"CONFIG": str(route_file), "SQLALCHEMY_DATABASE_URI": database, "CELERY_BROKER_URL": "memory://", "WEBHOOK_SECRET_KEYS": secret_key})
    identity = Identity(app)
    headers = {"X-API-Key": identity.key(identity.consumer("root"), scopes=("admin",)), "Content-Type": "application/json"}
    gateway = start_gateway(
        ROUTES,
        workers=1,
        DATABASE_URL=database,
        REDIS_URL="",
        GATEWAY_CELERY_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        GATEWAY_WEBHOOK_SECRET_KEYS=secret_key,
    )
    (worker,) = gateway.worker_pids()
    with requests.Session() as session:
        for url in ENDPOINTS:  # every endpoint once with a small body: the code is loaded before the first reading
            assert session.post(gateway.url + url, data=b"{}", headers=headers, timeout=10).status_code < 500
        start = rss(worker)
        answers = []
        for index in range(20):
            url = gateway.url + ENDPOINTS[index % len(ENDPOINTS)]
            # Most with a Content-Length (refused before a byte is read), every fourth chunked
            # (read up to the limit, then refused).
            data = chunks(BODY) if index % 4 == 3 else b"x" * BODY
            response = session.post(url, data=data, headers=headers, timeout=60)
            answers.append((response.status_code, response.headers.get("Content-Type"), response.json()["detail"]))
        grown = rss(worker) - start
    assert grown < 50 * MiB, f"the worker grew by {grown / MiB:.0f} MiB"
    assert all(status == 413 and kind == "application/problem+json" for status, kind, _ in answers), answers
    assert answers[0][2] == f"The request body ({BODY} bytes) exceeds the limit of {MiB} bytes (API_MAX_BODY_SIZE)"
    assert answers[3][2] == f"The request body exceeds the limit of {MiB} bytes (API_MAX_BODY_SIZE)"
    assert answers[4][2] == f"The request body ({BODY} bytes) exceeds the limit of {10 * MiB} bytes (MAX_BODY_SIZE)"
