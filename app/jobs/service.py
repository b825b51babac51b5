"""Submitting and cancelling jobs: a request becomes a job once per Idempotency-Key, is sent to a
worker after its commit, and ends with an outbox event for webhooks.

A submission is one ``INSERT`` that commits by itself (a batch: the job's and its items' in one
transaction), then one message: the row is written with SQLAlchemy Core from values built here,
so nothing is read back, and an ``Idempotency-Key`` costs a lookup only when the insert meets an
earlier job's key.
"""
from __future__ import annotations

import hashlib
import json
from datetime import timedelta

from flask import Flask, request
from sqlalchemy import insert, select, update
from werkzeug.datastructures import Headers
from werkzeug.routing import MapAdapter

from app import queue
from app.errors import ProblemError, database_errors
from app.extensions import db, insert_alone, insert_once
from app.gateway.idempotency import IdempotencyKeyReused, valid_key
from app.gateway.router import AmbiguousPath
from app.gateway.types import GatewayRequest, GatewayResponse
from app.identity import Principal
from app.jobs.calls import Call, call_from_request, principal_json
from app.jobs.resource import item_counts, job_json, status_url
from app.jobs.settings import settings
from app.jobs.waiting import announce
from app.models import Job, JobEvent, JobItem
from app.models.base import new_id, utcnow, written
from app.models.jobs import BATCH, CANCELED, NOT_STARTED, REQUEST, RUNNING
from app.observability import metrics

EVENT_TYPES = {"succeeded": "job.succeeded", "failed": "job.failed", "canceled": "job.canceled"}


class JobFinal(ProblemError):
    """409: a job that has already ended cannot be canceled."""

    status, title, slug = 409, "Conflict", "job-final"


# One Idempotency-Key vocabulary for the gateway: the same rules and problems as replays.
IdempotencyMismatch = IdempotencyKeyReused


def create(
    kind: str,
    calls: list[Call],
    principal: Principal | None,
    client: dict,
    request_id: str,
    idempotency_key: str | None,
    client_ip: str | None = None,
) -> tuple[Job, bool]:
    """Write a job (and its batch items) and commit; return ``(job, created)``.

    With ``idempotency_key`` a submission repeating an earlier one (same key, same requests)
    returns the earlier job with ``created`` False. Raises IdempotencyMismatch (422) when the
    key was used for different requests. Keys are scoped to the consumer, or for anonymous
    callers to the client address (after TRUSTED_PROXY_HOPS): ``client_ip``, else the current
    request's. Call in an app context; enqueueing is the caller's job, after this commit.
    """
    # What a repeat of the key is compared with: only a keyed submission can be repeated.
    digest = _digest(kind, calls) if idempotency_key else None
    scope = _scope(principal, client_ip) if idempotency_key else None
    return insert_once(
        idempotency_key,
        lambda: _by_key(scope, idempotency_key),
        lambda earlier: _same(earlier, digest),
        lambda: _write(kind, calls, principal, client, request_id, scope, idempotency_key, digest),
    )


def _write(
    kind: str, calls: list[Call], principal: Principal | None, client: dict, request_id: str, scope: str | None, key: str | None, digest: str | None
) -> Job:
    """Insert the job (and its batch items) and commit; return the job as written (not attached
    to the session: every column is known here, nothing is read back). A key already used in
    ``scope`` raises IntegrityError."""
    now = utcnow()
    values = {
        "id": new_id("job"),
        "kind": kind,
        "consumer_id": principal.consumer_id if principal else None,
        "status": NOT_STARTED,
        "progress": 0,
        "progress_message": "queued",
        "route": None,
        "method": None,
        "path": None,
        "raw_path": None,
        "query": None,
        "request_headers": None,
        "request_body": None,
        "client": client,
        "principal": principal_json(principal),
        "idempotency_scope": scope,
        "idempotency_key": key,
        "request_hash": digest,
        "request_id": request_id,
        "attempts": 0,
        "enqueues": 1,
        "created_at": now,
        "enqueued_at": now,  # optimistic: cleared if the enqueue fails, so beat retries it sooner
    }
    if kind == REQUEST:
        call = calls[0]
        values.update(
            route=call.route, method=call.method, path=call.path, raw_path=call.raw_path,
            query=call.query, request_headers=call.headers, request_body=call.body,
        )
    else:
        values["route"] = ", ".join(sorted({c.route or "" for c in calls}))[:200]
        values["progress_message"] = f"0 of {len(calls)} requests done"
    session = db.session
    if kind == REQUEST and not session().in_transaction():
        insert_alone(Job.__table__, values)
        return written(Job, values)
    # A batch's rows, or a request whose caller has a transaction open (its writes commit with the job).
    session.execute(insert(Job.__table__), values)
    if kind == BATCH:
        session.execute(
            insert(JobItem.__table__),
            [
                {
                    "job_id": values["id"],
                    "position": position,
                    "status": NOT_STARTED,
                    "route": call.route,
                    "method": call.method,
                    "path": call.path,
                    "raw_path": call.raw_path,
                    "query": call.query,
                    "request_headers": call.headers,
                    "request_body": call.body,
                }
                for position, call in enumerate(calls)
            ],
        )
    session.commit()
    return written(Job, values)


def replay_of(key: str, principal: Principal | None) -> bool:
    """True when ``key`` already names a job of this caller (the submission is a repeat)."""
    return _by_key(_scope(principal), key) is not None


def _scope(principal: Principal | None, client_ip: str | None = None) -> str:
    """Whose Idempotency-Keys these are: the consumer's, or an anonymous client address's."""
    if principal:
        return principal.consumer_id
    return f"ip:{(request.remote_addr if client_ip is None else client_ip) or ''}"


def _digest(kind: str, calls: list[Call]) -> str:
    return hashlib.sha256(("|".join([kind, *(call.digest() for call in calls)])).encode()).hexdigest()


def _by_key(scope: str | None, key: str) -> Job | None:
    return db.session.execute(
        select(Job).where(Job.idempotency_scope == scope, Job.idempotency_key == key)
    ).scalar_one_or_none()


def _same(earlier: Job, digest: str | None) -> Job:
    if earlier.request_hash != digest:
        raise IdempotencyMismatch(
            "This Idempotency-Key was used for a different request; send a new key for a new job"
        )
    return earlier


def enqueue(job_ids: list[str]) -> list[str]:
    """Send a ``run`` message per job; return the ids whose message could not be sent.

    Those are marked as never enqueued, so the sweeper sends them on its next pass.
    """
    return queue.send_each(
        queue.RUN_JOB, job_ids, "job", lambda failed: update(Job).where(Job.id.in_(failed), Job.status == NOT_STARTED).values(enqueued_at=None)
    )


def accepted(job: Job, created: bool, urls: MapAdapter | None = None) -> tuple[dict, Headers]:
    """The 202's body (the job resource) and headers: ``Location`` and ``Operation-Location``
    (the absolute status URL), ``Retry-After`` (seconds), and ``Idempotent-Replayed: true``
    when an ``Idempotency-Key`` matched an earlier submission. URLs are built with ``urls``,
    else from the current request."""
    url = status_url(job.id, urls)
    headers = Headers([("Location", url), ("Operation-Location", url)])
    if not job.final:
        headers["Retry-After"] = str(settings().retry_after)
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return job_json(job, urls=urls if urls is not None else True, items=item_counts(job)), headers


def accept(app: Flask, req: GatewayRequest) -> GatewayResponse:
    """The handler of a ``mode: async`` route, registered as ``app.extensions["job_submit"]``:
    the request becomes a job (202), and a worker makes the upstream call. The proxy calls it
    outside any Flask context: it enters ``app``'s for the database. Raises IdempotencyMismatch
    (422), AmbiguousPath (400) for a NUL in the path, which the job row cannot store (even on a
    route that allows ambiguous paths), or DatabaseUnavailable (503 ``database-unavailable``)
    when the job cannot be written."""
    if "\x00" in req.path:
        raise AmbiguousPath("The path contains NUL (%00), which a job cannot store.")
    call = call_from_request(req)
    client = {"addr": req.client_addr, "scheme": req.scheme, "host": req.host}
    key = idempotency_key(req.headers.get("Idempotency-Key"))
    with database_errors(), app.app_context():
        job, created = create(REQUEST, [call], req.principal, client, req.request_id, key, client_ip=req.client_ip)
        if created:
            enqueue([job.id])
        body, headers = accepted(job, created, app.url_map.bind(req.host, url_scheme=req.scheme))
    headers["Content-Type"] = "application/json"
    return GatewayResponse(status=202, headers=headers, body=[json.dumps(body).encode()])


def idempotency_key(value: str | None) -> str | None:
    """A valid ``Idempotency-Key`` value, None when absent; raises BadIdempotencyKey (400)
    as ``app.gateway.idempotency.valid_key`` does."""
    return None if value is None else valid_key(value)


def event_row(job: Job) -> dict:
    """The outbox row (``job_events``) for ``job``'s final state, as column values."""
    return {
        "id": new_id("evt"),
        "job_id": job.id,
        "consumer_id": job.consumer_id,
        "type": EVENT_TYPES[job.status],
        "data": job_json(job, urls=False),
        "created_at": utcnow(),
        "published_at": None,
    }


def record_event(job: Job) -> None:
    """Insert the outbox row for ``job``'s final state (in the caller's transaction)."""
    db.session.execute(insert(JobEvent.__table__), event_row(job))


def cancel(job: Job) -> Job:
    """Cancel ``job`` unless it has ended: a queued job never runs, a running batch stops
    before its next sub-request, a running request's answer is discarded.

    Raises JobFinal (409) when the job had already ended. One conditional UPDATE decides,
    so a cancel racing the worker's finish has exactly one winner.
    """
    now = utcnow()
    done = db.session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_((NOT_STARTED, RUNNING)))
        .values(
            status=CANCELED,
            progress_message="canceled",
            finished_at=now,
            expires_at=now + timedelta(seconds=settings().result_ttl),
            lease_expires_at=None,
        )
    ).rowcount
    if not done:
        db.session.rollback()
        db.session.refresh(job)
        raise JobFinal(f"The job has already ended ({job.status}); only a job not yet final can be canceled")
    db.session.execute(
        update(JobItem).where(JobItem.job_id == job.id, JobItem.status == NOT_STARTED).values(status=CANCELED)
    )
    db.session.refresh(job)
    record_event(job)
    db.session.commit()
    announce(job.id, CANCELED)
    metrics.JOBS.labels(CANCELED).inc()
    if job.consumer_id is not None:
        from app.webhooks import messages

        messages.publish_job_events_later()
    return job
