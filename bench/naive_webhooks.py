"""The "naive" peer for bench/webhooks.py: one Celery task per delivery that signs and POSTs, nothing more.

``deliver(url, message_id, body)`` computes the Standard Webhooks signature by hand
(``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` with the secret's bytes) and calls
``requests.post`` (a new session, so a new connection, per call; the gateway's sender keeps
connections alive in pools). No database, no claim, no attempt log, no SSRF check, no retry
schedule: what sending a webhook costs before a gateway does anything. The body travels in the
task message; the gateway's tasks carry only ids and read the rest from SQL.

Configured from the environment, which bench/webhooks.py sets: ``NAIVE_BROKER_URL``,
``NAIVE_KEY_PREFIX`` (the Redis key prefix of its queue) and ``NAIVE_SECRET`` (``whsec_`` +
base64, the same secret the gateway's endpoint signs with).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

import requests
from celery import Celery

SECRET = base64.b64decode(os.environ.get("NAIVE_SECRET", "whsec_" + "A" * 44).removeprefix("whsec_"))

# Not the current app: bench/webhooks.py imports this next to the gateway's app, whose shared
# tasks must keep resolving to the gateway's Celery app (its broker prefix and queues).
celery_app = Celery("naive", broker=os.environ.get("NAIVE_BROKER_URL", "redis://127.0.0.1:6379/0"), set_as_current=False)
celery_app.conf.update(
    # The gateway's delivery guarantees (DESIGN, "Worker rules"), so that the comparison is
    # about the task's code and not about Celery settings.
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    broker_transport_options={"global_keyprefix": os.environ.get("NAIVE_KEY_PREFIX", "bench-naive") + ":"},
)


@celery_app.task(name="bench.naive_webhook")
def deliver(url: str, message_id: str, body: str) -> int:
    """POST ``body`` to ``url`` with Standard Webhooks headers; return the status code."""
    timestamp = str(int(time.time()))
    digest = hmac.new(SECRET, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    response = requests.post(
        url,
        data=body.encode(),
        headers={
            "webhook-id": message_id,
            "webhook-timestamp": timestamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode(),
            "content-type": "application/json",
        },
        timeout=15,
    )
    return response.status_code
