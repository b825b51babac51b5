"""The worker's side of jobs: claim a job, make its calls, store the outcome; sweep stuck jobs.

Every write a worker makes is conditional on ``status = running`` and on the attempt number
it claimed (a fencing token): a worker whose claim lapsed, or whose job was canceled, cannot
overwrite anything. Transactions start with their write, so SQLite never has to upgrade a
read lock (which fails at once under contention) and Postgres needs no SELECT ... FOR UPDATE.

A request job takes two statements, each committed on its own (no BEGIN or COMMIT round trips):
the claim, ``UPDATE ... RETURNING`` the row with its stored request; and on PostgreSQL the end,
``WITH ended AS (UPDATE ... RETURNING) INSERT INTO job_events ... SELECT FROM ended``, so the
event exists exactly when the fenced final write does (on SQLite, which has no UPDATE in a WITH,
the UPDATE and the INSERT in one transaction). Then its waiters are woken (``app.jobs.waiting``).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import datetime, timedelta
from typing import Self

from celery.exceptions import SoftTimeLimitExceeded
from flask import current_app
from sqlalchemy import (
    JSON,
    LargeBinary,
    and_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import undefer

from app.errors import ProblemError
from app.extensions import committed_alone, db, lock_rows
from app.jobs.calls import Call, Outcome, make_call, principal_from
from app.jobs.resource import problem_json
from app.jobs.service import enqueue, event_row, record_event
from app.jobs.settings import JobSettings, settings
from app.jobs.waiting import announce
from app.models import Job, JobEvent, JobItem
from app.models.base import UTCDateTime, utcnow
from app.models.jobs import (
    BATCH,
    CANCELED,
    FAILED,
    FINAL,
    NOT_STARTED,
    REQUEST,
    RUNNING,
    SUCCEEDED,
)
from app.observability import metrics
from app.webhooks import messages

log = logging.getLogger("frontdoor.jobs")


class JobTimeout(ProblemError):
    """504, in a failed job's error: the call ran past GATEWAY_JOB_SOFT_TIME_LIMIT seconds."""

    status, title, slug = 504, "Gateway Timeout", "job-timeout"


class JobAbandoned(ProblemError):
    """The job's worker was lost (killed, out of memory) on every attempt."""

    status, title, slug = 500, "Internal Server Error", "job-abandoned"


def _mine(job_id: str, attempt: int):
    """The WHERE clause of every write a worker makes to the job it claimed."""
    return and_(Job.id == job_id, Job.status == RUNNING, Job.attempts == attempt)


# What the job's event (``record_event``: the job resource without URLs) and the end's
# bookkeeping read: returned by the final UPDATE, so the row is not read again.
SHOWN = (
    Job.id, Job.kind, Job.consumer_id, Job.status, Job.progress, Job.progress_message, Job.route, Job.request_id,
    Job.attempts, Job.created_at, Job.started_at, Job.finished_at, Job.expires_at, Job.error, Job.method, Job.path,
    Job.query, Job.result_status, Job.result_size,
)
# What running the job reads besides: the stored request and who sent it.
TO_RUN = (*SHOWN, Job.raw_path, Job.request_headers, Job.request_body, Job.client, Job.principal)

# The UPDATEs below name the columns they return; the session holds no job to keep in step.
NO_SYNC = {"synchronize_session": False}


def _claim_statement():
    """``UPDATE jobs ... RETURNING``: take a job that is notStarted, or running with a lapsed claim."""
    now = bindparam("now", type_=UTCDateTime())
    return (
        update(Job.__table__)
        .where(
            Job.id == bindparam("job_id"),
            or_(Job.status == NOT_STARTED, and_(Job.status == RUNNING, Job.lease_expires_at < now)),
        )
        .values(
            status=RUNNING,
            attempts=Job.attempts + 1,
            started_at=func.coalesce(Job.started_at, now),
            lease_expires_at=bindparam("lease_until", type_=UTCDateTime()),
            # A request job has nothing to report between its claim and its call.
            progress_message="running",
        )
        .returning(*TO_RUN)
    )


def _end_statement():
    """PostgreSQL: ``WITH ended AS (UPDATE jobs ... RETURNING) INSERT INTO job_events ... SELECT
    FROM ended``: a request job's final write, fenced by its attempt, and its event, or neither."""
    nullable = JSON(none_as_null=True)
    ended = (
        update(Job.__table__)
        .where(Job.id == bindparam("job_id"), Job.status == RUNNING, Job.attempts == bindparam("attempt"))
        .values(
            status=bindparam("status"),
            progress=bindparam("progress"),
            progress_message=bindparam("status"),
            finished_at=bindparam("finished_at", type_=UTCDateTime()),
            expires_at=bindparam("expires_at", type_=UTCDateTime()),
            lease_expires_at=None,
            error=bindparam("error", type_=nullable),
            result_status=bindparam("result_status"),
            result_headers=bindparam("result_headers", type_=nullable),
            result_body=bindparam("result_body", type_=LargeBinary()),
            result_size=bindparam("result_size"),
        )
        .returning(Job.id, Job.consumer_id)
        .cte("ended")
    )
    event = select(
        bindparam("event_id"),
        ended.c.id,
        ended.c.consumer_id,
        bindparam("event_type"),
        bindparam("event_data", type_=JSON()),
        bindparam("event_created_at", type_=UTCDateTime()),
    )
    return (
        insert(JobEvent.__table__)
        .from_select(["id", "job_id", "consumer_id", "type", "data", "created_at"], event)
        .returning(JobEvent.job_id)
    )


# Built once: a job's two statements are the same every time but for their values.
CLAIM, END = _claim_statement(), _end_statement()


def claim(job_id: str, lease: float, conn: Connection) -> Job | None:
    """Take ``job_id`` for this worker: notStarted, or running with a lapsed claim (its worker
    died). Returns the claimed job (``attempts`` is the fencing token; not attached to the
    session), or None when the job has ended, was canceled, or is held by a live worker: a
    duplicate message does nothing. One ``UPDATE ... RETURNING``, committed by itself on
    ``conn`` (a ``committed_alone`` connection).
    """
    now = utcnow()
    values = {"job_id": job_id, "now": now, "lease_until": now + timedelta(seconds=lease)}
    row = conn.execute(CLAIM, values).one_or_none()
    return None if row is None else Job(**row._asdict())


class Heartbeat:
    """Renews a claimed job's lease every third of ``lease`` seconds from a thread; sets
    ``stopped`` when the job is no longer this worker's (canceled, or claimed by another).

    Renewal stops at ``until`` (the job's start plus JOB_TIME_LIMIT): a job hung past its
    hard limit in a pool that cannot kill it still lapses, and the sweep fails it.
    """

    def __init__(self, job_id: str, attempt: int, lease: float, until: datetime):
        self.job_id, self.attempt, self.lease, self.until = job_id, attempt, lease, until
        self.stopped = threading.Event()
        self._done = threading.Event()
        self._engine = db.engine
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.lease / 3):
            if utcnow() >= self.until:
                self.stopped.set()
                return
            try:
                with self._engine.begin() as conn:
                    renewed = conn.execute(
                        update(Job)
                        .where(_mine(self.job_id, self.attempt))
                        .values(lease_expires_at=utcnow() + timedelta(seconds=self.lease))
                    ).rowcount
            except Exception:
                log.warning("job lease renewal failed", extra={"job_id": self.job_id}, exc_info=True)
                continue
            if not renewed:
                self.stopped.set()
                return


def run(job_id: str) -> str | None:
    """Run the job ``job_id`` if it can be claimed; return its final status, or None when
    this call did nothing (ended, canceled, or held by another worker). Safe to call twice."""
    config = settings()
    with ExitStack() as held:
        # A request job's claim and end share one connection: one pool checkout (and ping).
        conn = held.enter_context(committed_alone())
        job = claim(job_id, config.lease, conn)
        if job is None:
            log.info("job not claimed", extra={"job_id": job_id})
            return None
        if job.kind == BATCH:
            held.close()  # a batch writes through the session and its own connections
        attempt = job.attempts
        if attempt == 1 and job.started_at is not None and job.created_at is not None:
            metrics.JOB_QUEUE_SECONDS.observe(max((job.started_at - job.created_at).total_seconds(), 0.0))
        if attempt > config.max_attempts:
            error = JobAbandoned(f"The job's worker was lost on each of {config.max_attempts} attempts")
            return _finish(job_id, attempt, FAILED, error=problem_json(error))
        request_id = job.request_id
        log.info("job started", extra={"job_id": job_id, "attempt": attempt, "request_id": request_id})
        until = (job.started_at or utcnow()) + timedelta(seconds=config.time_limit)
        with Heartbeat(job_id, attempt, config.lease, until) as heartbeat:
            try:
                if job.kind == BATCH:
                    status = _run_batch(job, attempt, config, heartbeat)
                else:
                    status = _run_request(job, attempt, config, conn)
            except SoftTimeLimitExceeded:
                db.session.rollback()  # the limit may have struck inside a write
                error = JobTimeout(f"The job ran longer than JOB_SOFT_TIME_LIMIT ({config.soft_time_limit:g} s)")
                status = _finish(job_id, attempt, FAILED, error=problem_json(error))
    log.info("job ended", extra={"job_id": job_id, "status": status, "request_id": request_id})
    return status


def _context(job: Job) -> tuple:
    return job.client or {}, principal_from(job.principal), job.request_id or ""


def _run_request(job: Job, attempt: int, config: JobSettings, conn: Connection) -> str | None:
    call = Call(job.method, job.raw_path, job.query or "", [tuple(h) for h in job.request_headers or ()], job.request_body or b"", job.route)
    client, principal, request_id = _context(job)
    outcome = make_call(current_app.extensions["gateway"], call, client, principal, request_id, config.max_result_size, problem_json)
    if not outcome.ok:
        return _finish(job.id, attempt, FAILED, error=outcome.error, claimed=(job, conn))
    return _finish(job.id, attempt, SUCCEEDED, outcome=outcome, claimed=(job, conn))


def _run_batch(job: Job, attempt: int, config: JobSettings, heartbeat: Heartbeat) -> str | None:
    """Run the batch's unfinished items, ``batch_concurrency`` at a time; each finished item is
    stored at once, so a batch taken over after a lost worker resumes where it stopped."""
    items = list(
        db.session.execute(
            select(JobItem)
            .options(undefer(JobItem.request_headers), undefer(JobItem.request_body))
            .where(JobItem.job_id == job.id)
            .order_by(JobItem.position)
        ).scalars()
    )
    total = len(items)
    done = sum(1 for item in items if item.finished_at is not None)
    pending = [
        (item.position, Call(item.method, item.raw_path, item.query, [tuple(h) for h in item.request_headers], item.request_body or b"", item.route))
        for item in items
        if item.finished_at is None and item.status == NOT_STARTED
    ]
    gateway = current_app.extensions["gateway"]
    engine = db.engine
    client, principal, request_id = _context(job)
    job_id = job.id
    lock = threading.Lock()
    counter = {"done": done}
    app = current_app._get_current_object()
    db.session.close()  # everything needed is read: no transaction stays open while the batch runs

    def still_mine() -> bool:
        if heartbeat.stopped.is_set():
            return False
        with engine.connect() as conn:
            row = conn.execute(select(Job.status, Job.attempts).where(Job.id == job_id)).one_or_none()
        return row is not None and row.status == RUNNING and row.attempts == attempt

    def run_item(position: int, call: Call) -> None:
        if not still_mine():
            return  # canceled (or taken over): the remaining items are not sent
        with app.app_context():
            outcome = make_call(gateway, call, client, principal, request_id, config.max_result_size, problem_json)
        now = utcnow()
        with engine.begin() as conn:
            stored = conn.execute(
                update(JobItem)
                .where(
                    JobItem.job_id == job_id,
                    JobItem.position == position,
                    JobItem.finished_at.is_(None),
                    exists().where(_mine(job_id, attempt)),  # not after a cancel or a takeover
                )
                .values(
                    status=SUCCEEDED if outcome.ok else FAILED,
                    result_status=outcome.status,
                    result_headers=outcome.headers,
                    result_body=outcome.body,
                    error=outcome.error,
                    finished_at=now,
                )
            ).rowcount
            if not stored:
                return
            with lock:
                counter["done"] += 1
                finished = counter["done"]
            conn.execute(
                update(Job)
                .where(_mine(job_id, attempt))
                .values(progress=finished * 100 // total, progress_message=f"{finished} of {total} requests done")
            )

    pool = ThreadPoolExecutor(max_workers=min(config.batch_concurrency, max(len(pending), 1)), thread_name_prefix="batch")
    try:
        for future in [pool.submit(run_item, position, call) for position, call in pending]:
            future.result()
    except BaseException:
        # The soft time limit (or a crash): start nothing more; calls in flight end on their own.
        heartbeat.stopped.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if not still_mine():
        return None  # canceled meanwhile: the cancel wrote the final state
    return _finish(job_id, attempt, SUCCEEDED)


def _finish(
    job_id: str,
    attempt: int,
    status: str,
    outcome: Outcome | None = None,
    error: dict | None = None,
    lapsed_before: datetime | None = None,
    claimed: tuple[Job, Connection] | None = None,
) -> str | None:
    """Make the job final (when it is still this attempt's) and record its event; return
    ``status``, or None when the job was no longer this worker's to finish. With
    ``lapsed_before`` only a job whose lease lapsed before then is finished (the sweeper).
    ``claimed``: the request job as this worker claimed it and the connection it claimed it
    on; its event is then written in the same statement as the final UPDATE (PostgreSQL)."""
    now = utcnow()
    values = {
        "status": status,
        "finished_at": now,
        "expires_at": now + timedelta(seconds=settings().result_ttl),
        "lease_expires_at": None,
        "error": error,
        "progress_message": status,
    }
    if status == SUCCEEDED:
        values["progress"] = 100
    if outcome is not None:
        values.update(
            result_status=outcome.status,
            result_headers=outcome.headers,
            result_body=outcome.body,
            result_size=len(outcome.body or b""),
        )
    if claimed is not None and claimed[0].kind == REQUEST and lapsed_before is None and db.engine.dialect.name == "postgresql":
        job = _end_request(*claimed, attempt, values)
        if job is None:
            return None
        return _ended(job)
    where = _mine(job_id, attempt)
    if lapsed_before is not None:
        where = and_(where, Job.lease_expires_at < lapsed_before)
    row = db.session.execute(update(Job).where(where).values(**values).returning(*SHOWN), execution_options=NO_SYNC).one_or_none()
    if row is None:
        db.session.rollback()
        return None
    job = Job(**row._asdict())
    if status != SUCCEEDED and job.kind != REQUEST:
        # Sub-requests that never finished were not sent, or their answer is not kept.
        db.session.execute(
            update(JobItem).where(JobItem.job_id == job_id, JobItem.finished_at.is_(None)).values(status=CANCELED)
        )
    record_event(job)
    db.session.commit()
    return _ended(job)


def _end_request(claimed: Job, conn: Connection, attempt: int, values: dict) -> Job | None:
    """PostgreSQL: the final UPDATE, fenced by ``attempt``, and its event's INSERT as one
    statement committed by itself (END), on ``conn``; return the job as it ended, or None (and
    nothing written) when it was no longer this attempt's. The event shows the claimed row with
    ``values`` (a request job's row changes only through this worker's writes, or a cancel,
    which fences it out). A connection that died during the call is replaced once: the write is
    fenced, so trying it again cannot end the job twice."""
    job = Job(**{**{column.key: getattr(claimed, column.key) for column in SHOWN}, **values})
    event = event_row(job)
    params = {
        "job_id": claimed.id,
        "attempt": attempt,
        "progress": job.progress,
        "result_status": None,
        "result_headers": None,
        "result_body": None,
        "result_size": None,
        **{key: value for key, value in values.items() if key != "lease_expires_at"},
        "event_id": event["id"],
        "event_type": event["type"],
        "event_data": event["data"],
        "event_created_at": event["created_at"],
    }
    try:
        written = conn.execute(END, params).one_or_none()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        log.warning("the database connection was lost during the job; ending it on a new one", extra={"job_id": claimed.id})
        with committed_alone() as fresh:
            written = fresh.execute(END, params).one_or_none()
    return job if written is not None else None


def _ended(job: Job) -> str:
    """What follows a job's final commit: its waiters are woken, it is counted, and its event
    is published to the consumer's webhooks."""
    announce(job.id, job.status)
    metrics.JOBS.labels(job.status).inc()
    if job.consumer_id is not None:  # an anonymous job's event has no subscriber
        messages.publish_job_events_later()
    return job.status


def _due(job: Job, now: datetime, config: JobSettings) -> bool:
    """Whether a job waiting for a worker has waited long enough to be enqueued again: one never
    enqueued (its enqueue failed) after a sweep interval, else after JOB_REQUEUE_AFTER seconds,
    doubled for each message already sent (up to an hour), so a queue with no worker does not
    fill with copies."""
    if job.enqueued_at is None:
        return job.created_at <= now - timedelta(seconds=config.sweep_interval)
    wait = min(config.requeue_after * 2 ** max(job.enqueues - 1, 0), 3600.0)
    return job.enqueued_at <= now - timedelta(seconds=wait)


def sweep(limit: int = 500) -> dict[str, int]:
    """Beat's pass over jobs (each step at most ``limit`` rows); return counts by action.

    - notStarted jobs whose message may be lost are enqueued again (the task is idempotent);
    - running jobs whose lease lapsed (their worker died) are enqueued again, or failed once
      they have used JOB_MAX_ATTEMPTS or run past JOB_TIME_LIMIT since they started;
    - jobs past ``expires_at`` lose their request and result payloads (the row answers 410);
    - rows JOB_RETENTION seconds past expiry are deleted (the id then answers 404).
    """
    config = settings()
    now = utcnow()
    counts = {"requeued": 0, "failed": 0, "expired": 0, "deleted": 0}
    # Only rows that may be due: a long queue of fresh jobs cannot hide the stuck ones.
    waiting = lock_rows(
        select(Job)
        .where(
            Job.status == NOT_STARTED,
            or_(
                and_(Job.enqueued_at.is_(None), Job.created_at <= now - timedelta(seconds=config.sweep_interval)),
                Job.enqueued_at <= now - timedelta(seconds=config.requeue_after),
            ),
        )
        .order_by(func.coalesce(Job.enqueued_at, Job.created_at))
        .limit(limit)
    )
    lapsed = lock_rows(
        select(Job).where(Job.status == RUNNING, Job.lease_expires_at < now).order_by(Job.lease_expires_at).limit(limit)
    )
    stale = [*lapsed, *waiting]
    requeue, abandon = [], []
    for job in stale:
        if job.status == RUNNING and (
            job.attempts >= config.max_attempts
            or (job.started_at is not None and job.started_at <= now - timedelta(seconds=config.time_limit))
        ):
            abandon.append((job.id, job.attempts, job.attempts >= config.max_attempts))
        elif _due(job, now, config):
            job.enqueued_at, job.enqueues = now, job.enqueues + 1
            requeue.append(job.id)
    db.session.commit()
    for job_id, attempt, lost in abandon:
        error = (
            JobAbandoned(f"The job's worker was lost on each of {config.max_attempts} attempts")
            if lost
            else JobTimeout(f"The job ran longer than JOB_TIME_LIMIT ({config.time_limit:g} s)")
        )
        # Conditional on the attempt: a worker that renewed its lease meanwhile keeps the job.
        if _finish(job_id, attempt, FAILED, error=problem_json(error), lapsed_before=now):
            counts["failed"] += 1
    enqueue(requeue)
    counts["requeued"] = len(requeue)

    expired = lock_rows(
        select(Job).where(Job.expires_at <= now, Job.purged_at.is_(None), Job.status.in_(FINAL)).limit(limit)
    )
    ids = [job.id for job in expired]
    if ids:
        db.session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(
                purged_at=now,
                request_headers=None,
                request_body=None,
                result_headers=None,
                result_body=None,
                idempotency_key=None,  # the key may be used again for a new job
            )
        )
        db.session.execute(delete(JobItem).where(JobItem.job_id.in_(ids)))
    db.session.commit()
    counts["expired"] = len(ids)

    old = list(
        db.session.execute(
            select(Job.id).where(Job.purged_at <= now - timedelta(seconds=config.retention)).limit(limit)
        ).scalars()
    )
    if old:
        db.session.execute(delete(JobEvent).where(JobEvent.job_id.in_(old)))
        db.session.execute(delete(Job).where(Job.id.in_(old)))
    db.session.commit()
    counts["deleted"] = len(old)
    return counts

