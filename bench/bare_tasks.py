"""The "bare celery" peer for bench/jobs.py: an async route written by hand, nothing more.

A Flask app (``web``) whose POST inserts a row with plain SQLAlchemy Core, commits, calls
``celery_app.send_task("bench.noop", args=[id])`` and answers 202 with the id; its GET answers
the row's status. A Celery app (``celery_app``) whose task reads the row, POSTs its body to the
no-op upstream with requests and marks the row succeeded. No auth, routing, breaker, retry,
snapshot of headers, lease, progress or event: what any async job costs before a gateway
does anything.

Configured from the environment, which bench/jobs.py sets: ``BARE_DATABASE_URL`` (an
SQLAlchemy URL), ``BARE_BROKER_URL``, ``BARE_KEY_PREFIX`` (the Redis key prefix of its
queues) and ``BARE_UPSTREAM_URL``.
"""
from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime

import requests
from celery import Celery
from flask import Flask, jsonify, request
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    insert,
    select,
    update,
)

metadata = MetaData()
bare_jobs = Table(
    "bare_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("status", String(16), nullable=False),
    Column("body", LargeBinary),
    Column("result_status", Integer),
    Column("created_at", DateTime),  # naive UTC, as the gateway stores its own
    Column("started_at", DateTime),
    Column("finished_at", DateTime),
)

# create_engine does not connect: each gunicorn worker and each Celery pool process (both
# forked before their first query) opens its own connections. A pool as large as the threads
# (WEB_THREADS, as the gateway's): SQLAlchemy's default of 5 would open and close a connection
# for each checkout past it.
engine = create_engine(os.environ.get("BARE_DATABASE_URL", "sqlite://"), pool_size=max(5, int(os.environ.get("WEB_THREADS", "8"))))
UPSTREAM = os.environ.get("BARE_UPSTREAM_URL", "http://127.0.0.1:9/").rstrip("/") + "/noop"

celery_app = Celery("bare", broker=os.environ.get("BARE_BROKER_URL", "redis://127.0.0.1:6379/0"))
celery_app.conf.update(
    # The same delivery guarantees as the gateway's worker rules, so that the comparison is
    # about the job code and not about Celery settings.
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    broker_transport_options={"global_keyprefix": os.environ.get("BARE_KEY_PREFIX", "bench-bare") + ":"},
)
session = requests.Session()


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


@celery_app.task(name="bench.noop")
def noop(job_id: str) -> None:
    """Make the job's upstream call and mark it succeeded."""
    started = utcnow()
    with engine.connect() as conn:
        body = conn.execute(select(bare_jobs.c.body).where(bare_jobs.c.id == job_id)).scalar_one()
    answer = session.post(UPSTREAM, data=body, headers={"Content-Type": "application/json"}, timeout=5)
    with engine.begin() as conn:
        conn.execute(
            update(bare_jobs)
            .where(bare_jobs.c.id == job_id)
            .values(status="succeeded", result_status=answer.status_code, started_at=started, finished_at=utcnow())
        )


web = Flask(__name__)


@web.post("/async")
def submit():
    """Write the row, commit, then send the message naming it; 202 with the id."""
    job_id = uuid.uuid4().hex
    with engine.begin() as conn:
        conn.execute(
            insert(bare_jobs).values(id=job_id, status="notStarted", body=request.get_data(), created_at=utcnow())
        )
    celery_app.send_task("bench.noop", args=[job_id])
    return jsonify(id=job_id, status="notStarted"), 202, {"Location": f"/jobs/{job_id}"}


@web.get("/jobs/<job_id>")
def status(job_id: str):
    with engine.connect() as conn:
        found = conn.execute(select(bare_jobs.c.status).where(bare_jobs.c.id == job_id)).scalar_one_or_none()
    if found is None:
        return jsonify(error="not found"), 404
    return jsonify(id=job_id, status=found)


@web.get("/healthz")
def healthz():
    return jsonify(ok=True)
