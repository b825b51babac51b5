"""The job resource: a job as JSON, its status and result URLs, and finding a job for its owner.

It follows the Microsoft REST API guidelines for long-running operations: ``status`` is one of
notStarted, running, succeeded, failed, canceled; the status URL is sent as ``Location`` and
``Operation-Location``, and the result URL as ``resourceLocation`` once the job succeeded.
"""
from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import datetime

from flask import stream_with_context, url_for
from sqlalchemy import Select, func, select
from sqlalchemy.orm import undefer
from werkzeug.routing import MapAdapter
from werkzeug.wrappers import Response

from app.errors import ProblemError, problem_type
from app.extensions import db
from app.identity import Principal
from app.jobs.settings import settings
from app.models import Job, JobItem
from app.models.base import isoformat, utcnow
from app.models.jobs import BATCH, REQUEST


class JobExpired(ProblemError):
    """410: the job ended longer ago than JOB_RESULT_TTL; its result is gone."""

    status, title, slug = 410, "Gone", "job-expired"


class JobNotSucceeded(ProblemError):
    """409: the job's result was asked for before it succeeded."""

    status, title, slug = 409, "Conflict", "job-not-succeeded"


def problem_json(error: ProblemError) -> dict:
    """A ProblemError as the problem object a job keeps (RFC 9457 section 3)."""
    body = {"type": problem_type(error.slug), "title": error.title, "status": error.status, "detail": error.detail}
    body.update({k: v for k, v in error.extra.items() if isinstance(v, str | int | float | bool | list | dict)})
    return body


def is_expired(job: Job, now: datetime | None = None) -> bool:
    return job.purged_at is not None or (job.expires_at is not None and job.expires_at <= (now or utcnow()))


def job_json(job: Job, urls: bool | MapAdapter = True, items: dict[str, int] | None = None) -> dict:
    """The job resource: ``{"id", "kind", "status", "progress": {"percent", "message"}, ...}``.

    Timestamps are RFC 3339 UTC. ``error`` is a problem object (RFC 9457) or None; ``result``
    gives the upstream's status and body size (bytes) once a request job succeeded; a batch
    gives ``items``, its sub-request counts by status (``item_counts``). With ``urls`` (in a
    request context) ``resourceLocation`` is the absolute result URL once the job succeeded.
    """
    data = {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "progress": {"percent": job.progress, "message": job.progress_message},
        "route": job.route,
        "request_id": job.request_id,
        "attempts": job.attempts,
        "created_at": isoformat(job.created_at),
        "started_at": isoformat(job.started_at),
        "finished_at": isoformat(job.finished_at),
        "expires_at": isoformat(job.expires_at),
        "error": job.error,
    }
    if job.kind == REQUEST:
        data["request"] = {"method": job.method, "path": job.path, "query": job.query or ""}
        data["result"] = {"status": job.result_status, "size": job.result_size} if job.result_status is not None else None
    elif items is not None:
        data["items"] = items
    if urls and job.status == "succeeded":
        data["resourceLocation"] = result_url(job.id, None if urls is True else urls)
    return data


def item_counts(job: Job) -> dict[str, int] | None:
    """A batch's sub-requests by status, ``{"total": 5, "succeeded": 3, ...}``, counted in SQL
    (no result is read); None for a request job."""
    if job.kind != BATCH:
        return None
    rows = db.session.execute(
        select(JobItem.status, func.count()).where(JobItem.job_id == job.id).group_by(JobItem.status)
    ).all()
    counts = {status: count for status, count in rows}
    return {"total": sum(counts.values()), **counts}


def status_url(job_id: str, urls: MapAdapter | None = None) -> str:
    """The job's absolute status URL, from the public scheme and host (ProxyFix applies any
    trusted X-Forwarded-Proto/-Host first): the current request's, or those ``urls`` is bound to."""
    return _external("jobs.read", job_id, urls)


def result_url(job_id: str, urls: MapAdapter | None = None) -> str:
    return _external("jobs.result", job_id, urls)


def _external(endpoint: str, job_id: str, urls: MapAdapter | None) -> str:
    if urls is None:
        return url_for(endpoint, job_id=job_id, _external=True)
    return urls.build(endpoint, {"job_id": job_id}, force_external=True)


def of_consumer(consumer_id: str) -> Select:
    """The jobs of ``consumer_id`` (a query, for ``common.page`` and ``common.with_status``)."""
    return select(Job).where(Job.consumer_id == consumer_id)


def reachable(job_id: str, principal: Principal | None, payload: bool = False) -> Job | None:
    """``owned``, and raises JobExpired (410) once the job's result has expired: what the API
    and the portal answer for a job id."""
    job = owned(job_id, principal, payload)
    if job is not None and is_expired(job):
        ended = job.finished_at.isoformat() if job.finished_at else "an earlier time"
        raise JobExpired(f"Job {job_id} ended at {ended} and its result has expired")
    return job


def owned(job_id: str, principal: Principal | None, payload: bool = False) -> Job | None:
    """The job ``job_id`` if ``principal`` owns it: a consumer sees its own jobs, an anonymous
    caller the anonymous ones (whose unguessable id is the only way to them). None otherwise.
    With ``payload`` the stored request and response are read in the same query."""
    job = db.session.get(Job, job_id, options=[undefer("*")] if payload else ())
    if job is None:
        return None
    owner = principal.consumer_id if principal is not None else None
    return job if job.consumer_id == owner else None


def result_response(job: Job, item_shape: Callable[[dict], dict]) -> Response:
    """The result of ``job`` (read with its payload) as the client gets it: a request job's
    upstream answer as it was stored (status, headers, body); a batch's ``{"items": [...]}``,
    streamed one item at a time, each item passed through ``item_shape`` (the API's model).
    Raises JobNotSucceeded (409, Retry-After while it runs) before the job has succeeded."""
    if job.status != "succeeded":
        detail = f"The job is {job.status}; its result is available once it has succeeded"
        headers = {} if job.final else {"Retry-After": str(settings().retry_after)}
        raise JobNotSucceeded(detail, headers=headers, job_status=job.status)
    if job.kind == BATCH:
        return Response(stream_with_context(_batch_result(job.id, item_shape)), content_type="application/json")
    response = Response(job.result_body or b"", status=job.result_status)
    # Content-Length is the body's (werkzeug sets it): a HEAD job's upstream named a length
    # whose bytes it never sent.
    response.headers.extend(
        (name, value) for name, value in job.result_headers or () if name.lower() not in ("content-length", "content-type")
    )
    stored_type = next((value for name, value in job.result_headers or () if name.lower() == "content-type"), None)
    if stored_type is None:
        del response.headers["Content-Type"]
    else:
        response.headers["Content-Type"] = stored_type
    return response


def _batch_result(job_id: str, item_shape: Callable[[dict], dict]) -> Iterator[bytes]:
    """``{"items": [...]}`` one item at a time: a batch of large results is never all in memory,
    and no transaction stays open while a slow client reads."""
    positions = list(db.session.execute(select(JobItem.position).where(JobItem.job_id == job_id).order_by(JobItem.position)).scalars())
    db.session.close()
    yield b'{"items": ['
    for index, position in enumerate(positions):
        item = db.session.execute(
            select(JobItem).options(undefer("*")).where(JobItem.job_id == job_id, JobItem.position == position)
        ).scalar_one_or_none()
        db.session.close()
        if item is None:
            break  # the job expired while it was being read: the items sent so far stand
        yield (b", " if index else b"") + json.dumps(item_shape(_item_json(item))).encode()
    yield b"]}"


def _item_json(item) -> dict:
    """A batch item: its request, status, and the upstream's response (``body`` as text when it
    is UTF-8, else ``body_base64``) or the problem that prevented one."""
    data: dict[str, object] = {
        "index": item.position,
        "request": {"method": item.method, "path": item.path, "query": item.query, "route": item.route},
        "status": item.status,
        "error": item.error,
        "response": None,
    }
    if item.result_status is not None:
        content = item.result_body or b""
        response: dict[str, object] = {"status": item.result_status, "headers": [list(pair) for pair in item.result_headers or ()]}
        try:
            response["body"] = content.decode()
        except UnicodeDecodeError:
            response["body_base64"] = base64.b64encode(content).decode()
        data["response"] = response
    return data

