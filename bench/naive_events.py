"""The "naive-events" web peer for bench/webhooks.py: a Flask view that enqueues one naive delivery task per event.

``POST /events`` with ``{"type", "data"}`` answers 202 ``{"id"}`` once it has put one
``naive_webhooks.deliver`` task on the broker; its worker signs with ``hmac`` and POSTs to
the one receiver URL this app is configured with. No credential, no database, no event id
check, no payload limit: what publishing a webhook costs before a gateway does anything. The
body is the gateway's own payload format (``{"type","timestamp","data"}`` as compact JSON).

Configured from the environment, which bench/webhooks.py sets: ``NAIVE_EVENTS_URL`` (where
every event goes) and naive_webhooks' ``NAIVE_BROKER_URL``, ``NAIVE_KEY_PREFIX`` and
``NAIVE_SECRET``. Served by gunicorn as ``naive_events:app``.
"""
from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime

import naive_webhooks
from flask import Flask, request

URL = os.environ.get("NAIVE_EVENTS_URL", "http://127.0.0.1:9/in/naive-events")

app = Flask(__name__)


@app.post("/events")
def publish():
    """Enqueue one delivery of the event; 202 with its message id (the ``webhook-id`` it is sent with)."""
    event = request.get_json()
    message_id = "msg_" + secrets.token_hex(13)
    timestamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    body = json.dumps({"type": event["type"], "timestamp": timestamp, "data": event.get("data", {})},
                      separators=(",", ":"), ensure_ascii=False)
    naive_webhooks.deliver.apply_async((URL, message_id, body))
    return {"id": message_id}, 202


@app.get("/healthz")
def healthz():
    return {}
