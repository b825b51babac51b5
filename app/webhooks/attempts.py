"""The worker's batches: claim due deliveries, sign and send them at once, record the attempts.

A batch is claimed with one ``UPDATE ... RETURNING`` that also reads what the attempts send (the
message, the endpoint's URL and secrets), takes each delivery's attempt number (the fencing
token every later write is conditional on) and a lease, and honours each endpoint's
WEBHOOK_ENDPOINT_CONCURRENCY. Its deliveries are sent concurrently over kept-alive connections
(``sender.Pools``), each to the address the SSRF guard checked just before (once per URL and
batch: ``_Checked``). Their outcomes are written back with one multi-row insert of attempts,
one update of the deliveries and one commit.
A worker that dies mid-batch leaves the leases to lapse; the dispatcher records those attempts
as lost and schedules the next, so a delivery is never stranded. Retries are a due time on the
row, never a Celery countdown (DESIGN, "Worker rules"). On Postgres the claim's and the record's
statements, compiled once from Core, run on psycopg's cursor (``app.extensions.driver``); the
rest run as Core on the session's connection (``db.session.connection()``), never as ORM-enabled
``UPDATE``s, whose session bookkeeping (about 0.5 ms of CPU a statement) rows never loaded as
objects do not need.
"""
from __future__ import annotations

import functools
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import (
    Integer,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.sql import Executable

from app import queue
from app.extensions import (
    DriverStatement,
    among,
    db,
    driver,
    driver_alone,
    driver_transaction,
    naive_utc,
)
from app.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookMessage
from app.models.base import UTCDateTime, isoformat, new_id, utcnow
from app.models.webhooks import FAILED, PENDING, SCHEDULED, SENDING, SUCCEEDED, TEST
from app.observability import metrics, tracing
from app.webhooks import endpoints, messages, secrets
from app.webhooks.guard import Guard, Target, UnsafeURL
from app.webhooks.sender import Result, send
from app.webhooks.settings import ATTEMPT_MARGIN, DRAIN, SecretKeyUnset, settings

log = logging.getLogger("frontdoor.webhooks")

USER_AGENT = "Frontdoor-Webhooks/1.0"
# An attempt whose worker vanished: recorded like a network failure, then retried on schedule.
LOST = "the worker was lost during the attempt (its lease lapsed)"


@dataclass(frozen=True)
class Keys:
    """An endpoint's encrypted secrets, as ``endpoints.signing_secrets`` reads them."""

    secret_encrypted: bytes
    previous_secret_encrypted: bytes | None
    previous_secret_expires_at: datetime | None


@dataclass(frozen=True)
class Claim:
    """A delivery this worker holds: its attempt number (the fencing token) and what it sends.

    ``body`` and ``keys`` are None for an attempt recorded without sending (a lost one)."""

    delivery_id: str
    endpoint_id: str
    number: int
    tries: int
    trigger: str
    url: str
    created_at: datetime | None = None  # the delivery's: its lag is counted from here
    message_id: str | None = None
    request_id: str | None = None
    body: bytes | None = None
    keys: Keys | None = None
    failing_since: datetime | None = None  # the endpoint's, as claimed


@dataclass(frozen=True)
class Sent:
    """What one attempt saw, and the address it connected to (None when it sent nothing)."""

    result: Result
    address: str | None = None


# -- claiming ----------------------------------------------------------------------------------


def claim(limit: int, ids: Sequence[str] | None = None, now: datetime | None = None) -> list[Claim]:
    """Take up to ``limit`` pending, due deliveries (only those in ``ids`` when given), oldest
    due first within an endpoint, no more per endpoint than its free slots under
    WEBHOOK_ENDPOINT_CONCURRENCY (attempts in flight under a live lease count against them) nor
    than half its cap (rounded up), and never one of a disabled endpoint. Commits; returns the
    claims with what each sends.

    First the endpoints: up to ``limit`` with due deliveries, the least recently claimed first
    (so that endpoints take turns however many have work), are marked claimed and, on
    Postgres, locked (``FOR UPDATE SKIP LOCKED``): two workers never count one endpoint's free
    slots at once, and neither waits for the other. This takes a statement of its own, because
    under READ COMMITTED one statement reads one snapshot, in which a claim committed between
    its start and its lock would go uncounted; on SQLite the write serialises claims. Then one
    ``UPDATE ... RETURNING`` takes each endpoint's oldest due deliveries (an index range per
    endpoint, so this statement costs the same whatever the backlog) with their messages and
    the endpoints' URLs and secrets. The first statement looks at every enabled endpoint for
    due work: about 2 ms on Postgres with 1,000 endpoints that all have some.
    """
    config = settings()
    now = now or utcnow()
    params = {"now": now, "limit": limit, "lease_until": now + timedelta(seconds=config.lease)}
    if ids is not None:
        params["ids"] = list(ids)
    if db.session.get_bind().dialect.name == "postgresql":
        rows = _claim_postgres(_postgres_claim(ids is not None, config.endpoint_concurrency, _share(config)), params)
    else:
        rows = _claim_sqlite(_claim_statements(False, ids is not None, config.endpoint_concurrency, _share(config)), params, limit)
    return [
        Claim(
            delivery_id=row.id,
            endpoint_id=row.endpoint_id,
            number=row.attempts,
            tries=row.tries,
            trigger=row.trigger,
            url=row.url,
            created_at=row.created_at,
            message_id=row.message_id,
            request_id=row.request_id,
            body=messages.payload(row.type, row.message_created_at, row.data),
            keys=Keys(row.secret_encrypted, row.previous_secret_encrypted, row.previous_secret_expires_at),
            failing_since=row.failing_since,
        )
        for row in rows
    ]


@dataclass(frozen=True)
class _ClaimStatements:
    lock: Executable  # mark (and on Postgres lock) the endpoints whose turn it is
    take: Executable  # claim the picked deliveries
    free: Executable | None = None  # SQLite: each locked endpoint's free slots (at most its share)
    pick: Executable | None = None  # SQLite: one endpoint's oldest due deliveries
    sends: Executable | None = None  # SQLite: what the claimed deliveries send


@functools.lru_cache(maxsize=16)
def _claim_statements(postgres: bool, with_ids: bool, cap: int, share: int) -> _ClaimStatements:
    """The claim's statements, built once per shape (their values are bound parameters: ``now``,
    ``limit``, ``lease_until``, ``ids``, ``locked`` and SQLite's ``endpoint``, ``slots``,
    ``picked``, ``claimed``): a claim spends no time composing them."""
    d = WebhookDelivery
    now = bindparam("now", type_=UTCDateTime())
    due = and_(d.status == PENDING, d.next_attempt_at <= now)
    if with_ids:
        due = and_(due, among(d.id, "ids", postgres))
    turn = (
        select(WebhookEndpoint.id)
        .where(WebhookEndpoint.disabled.is_(False), select(d.id).where(d.endpoint_id == WebhookEndpoint.id, due).exists())
        .order_by(WebhookEndpoint.claimed_at.asc().nulls_first(), WebhookEndpoint.id)
        .limit(bindparam("limit", type_=Integer()))
    )
    if postgres:
        turn = turn.with_for_update(skip_locked=True)
    lock = update(WebhookEndpoint).where(WebhookEndpoint.id.in_(turn.scalar_subquery())).values(claimed_at=now).returning(WebhookEndpoint.id)
    busy = select(func.count()).where(in_flight(WebhookEndpoint.id, now)).correlate(WebhookEndpoint).scalar_subquery()
    locked = among(WebhookEndpoint.id, "locked", postgres)
    taking = update(d).values(
        status=SENDING,
        attempts=d.attempts + 1,
        tries=d.tries + 1,
        lease_expires_at=bindparam("lease_until", type_=UTCDateTime()),
        last_attempt_at=now,
    )
    columns = (d.id, d.endpoint_id, d.message_id, d.attempts, d.tries, d.trigger, d.created_at)
    sends = (
        WebhookMessage.type,
        WebhookMessage.data,
        WebhookMessage.created_at.label("message_created_at"),
        WebhookMessage.request_id,
        WebhookEndpoint.url,
        WebhookEndpoint.secret_encrypted,
        WebhookEndpoint.previous_secret_encrypted,
        WebhookEndpoint.previous_secret_expires_at,
        WebhookEndpoint.failing_since,
    )
    joined = (d.message_id == WebhookMessage.id, d.endpoint_id == WebhookEndpoint.id)
    if postgres:
        firsts = (
            # Ordered as the index is (by id within one due time too): no peers for the window to
            # read ahead, so a backlog due at one moment is not read whole.
            select(d.id, d.next_attempt_at, func.row_number().over(order_by=(d.next_attempt_at, d.id)).label("rank"))
            .where(d.endpoint_id == WebhookEndpoint.id, due)
            .order_by(d.next_attempt_at, d.id)
            .limit(share)
            .lateral()
        )
        picked = (
            select(firsts.c.id)
            .select_from(WebhookEndpoint)
            .join(firsts, true())
            .where(locked, firsts.c.rank + busy <= cap)
            .order_by(firsts.c.next_attempt_at)
            .limit(bindparam("limit", type_=Integer()))
            .scalar_subquery()
        )
        take = taking.where(d.id.in_(picked), d.status == PENDING, *joined).returning(*columns, *sends)
        return _ClaimStatements(lock, take)
    free = select(WebhookEndpoint.id, func.min(cap - busy, share)).where(locked)
    pick = (
        select(d.id)
        .where(d.endpoint_id == bindparam("endpoint"), due)
        .order_by(d.next_attempt_at, d.id)
        .limit(bindparam("slots", type_=Integer()))
    )
    take = taking.where(d.id.in_(bindparam("picked", expanding=True)), d.status == PENDING).returning(*columns)
    found = select(d.id, *sends).where(d.id.in_(bindparam("claimed", expanding=True)), *joined)
    return _ClaimStatements(lock, take, free, pick, found)


def _claim_sqlite(built: _ClaimStatements, params: dict, limit: int) -> list:
    """The claim on SQLite, on the session's connection: the endpoints (the write serialises
    claims), each one's free slots and oldest due deliveries (no LATERAL), the claim, and (its
    RETURNING names the updated table only) what the claimed deliveries send, in one transaction."""
    conn = db.session.connection()
    locked = list(conn.execute(built.lock, params).scalars())
    if not locked:
        db.session.rollback()
        return []
    picked: list[str] = []
    for endpoint_id, slots in conn.execute(built.free, {**params, "locked": locked}).all():
        if slots > 0:
            picked += conn.execute(built.pick, {**params, "endpoint": endpoint_id, "slots": slots}).scalars()
    picked = picked[:limit]
    if not picked:
        db.session.commit()  # the endpoints' turn is taken, as on Postgres
        return []
    claimed = {row.id: row for row in conn.execute(built.take, {**params, "picked": picked}).all()}
    found = conn.execute(built.sends, {"claimed": list(claimed)}).all() if claimed else []
    db.session.commit()
    return [_Both(claimed[row.id], row) for row in found]


@functools.lru_cache(maxsize=16)
def _postgres_claim(with_ids: bool, cap: int, share: int) -> tuple[DriverStatement, DriverStatement]:
    built = _claim_statements(True, with_ids, cap, share)
    return DriverStatement.of(built.lock), DriverStatement.of(built.take)


# The claim's transaction, in one round trip of its own:
# - psycopg prepares a statement run five times on a connection; Postgres would still plan the
#   claim's two statements anew for each claim's values (its "auto" mode keeps choosing custom
#   plans). Their plan does not depend on the values: each endpoint's due deliveries are one
#   range of ix_webhook_deliveries_endpoint_status_due whatever the time. Measured with
#   bench/webhooks.py: Postgres' CPU per delivery 0.58 -> 0.45 ms.
# - Its commit does not wait for the WAL to reach the disk (about 0.15 ms here; Postgres,
#   "Asynchronous Commit"). A claim lost in a Postgres crash is redone: the deliveries are
#   pending again and claimed again (delivery is at least once, and webhook-id lets a receiver
#   tell), and the record's commit, which waits, makes every earlier claim durable with it.
_CLAIM_SETTINGS = "SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL synchronous_commit = off"

# The columns the claim returns that hold times (naive UTC in the row, UTC-aware in a Claim).
_CLAIM_TIMES = ("created_at", "message_created_at", "previous_secret_expires_at", "failing_since")


def _claim_postgres(statements: tuple[DriverStatement, DriverStatement], params: dict) -> list:
    """The claim on Postgres: the endpoints locked (``FOR UPDATE SKIP LOCKED``) and marked, then
    their deliveries taken with what they send (``UPDATE ... FROM ... RETURNING``), in one
    transaction on psycopg's cursor (``app.extensions.driver``), their prepared plans reused and
    the commit not waiting for the disk (``_CLAIM_SETTINGS``)."""
    lock, take = statements
    with driver_transaction() as cursor:
        cursor.execute(_CLAIM_SETTINGS)
        locked = [row.id for row in cursor.execute(lock.sql, lock.params(params))]
        if not locked:
            return []
        rows = cursor.execute(take.sql, take.params({**params, "locked": locked})).fetchall()
    return [row._replace(**{name: _aware(getattr(row, name)) for name in _CLAIM_TIMES}) for row in rows]


def _aware(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


def in_flight(endpoint_id, now):
    """The condition on deliveries that are attempts in flight to ``endpoint_id`` (a value, or
    a column to correlate with): being sent under a live lease. What an endpoint's cap counts."""
    return and_(
        WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == SENDING, WebhookDelivery.lease_expires_at > now
    )


def _share(config) -> int:
    """At most half an endpoint's slots (rounded up) per claim: with a busy endpoint, a second
    worker's batch is sent while the first one's is recorded and claimed again."""
    return -(-config.endpoint_concurrency // 2)


class _Both:
    """A claimed delivery's columns and its message's and endpoint's, as one row."""

    def __init__(self, delivery, sends):
        self._delivery, self._sends = delivery, sends

    def __getattr__(self, name: str):
        return getattr(self._delivery, name) if name in self._delivery._fields else getattr(self._sends, name)


# -- sending -----------------------------------------------------------------------------------


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _threads(size: int) -> ThreadPoolExecutor:
    """This process's sending threads (made on first use: after a Celery worker forks)."""
    global _executor
    with _executor_lock:
        if _executor is None or _executor._max_workers < size:
            _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="webhook-send")
        return _executor


def attempt(work: Claim, signing: list[str] | Sent, config, trace: list[tuple[str, str]] = (), check: Callable[[str], Target] | None = None) -> Sent:
    """Sign and send one claimed delivery with ``signing`` (its endpoint's secrets, or the
    failed attempt reading them was: ``signing_for``); never raises. Needs no app context
    (``config``: the app's webhook Settings), so a sending thread runs it as it is.

    The URL is checked again (resolved, every address public or allowed: ``check``, by default
    the guard's own) and the request goes to the address checked. A secret that cannot be read
    or a URL refused is a failed attempt that sent nothing.
    """
    if isinstance(signing, Sent):
        return signing
    try:
        target = (check or config.guard.check)(work.url)
    except UnsafeURL as exc:
        return Sent(Result(None, 0, error=f"refused: {exc}"[:500]))
    timestamp = utcnow()
    headers = {
        "webhook-id": work.message_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": secrets.sign(signing, work.message_id, timestamp, work.body.decode()),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "accept-encoding": "identity",  # the excerpt is the body's first bytes as sent
        **dict(trace),
    }
    return Sent(send(target, headers, work.body, config.timeout, config.verify), target.address)


def signing_for(works: list[Claim]) -> dict[str, list[str] | Sent]:
    """Each endpoint's secrets to sign with (decrypted once per batch, in the app context), or
    the failed attempt its deliveries are when they cannot be read."""
    found: dict[str, list[str] | Sent] = {}
    for work in works:
        if work.endpoint_id not in found:
            try:
                found[work.endpoint_id] = endpoints.signing_secrets(work.keys)
            except (secrets.SecretUnreadable, SecretKeyUnset) as exc:
                found[work.endpoint_id] = Sent(Result(None, 0, error=str(getattr(exc, "detail", exc))[:500]))
    return found


class _Checked:
    """The SSRF guard's verdicts for one batch: each URL is resolved and checked once, by the
    first of its attempts, just before they are sent; the batch's other attempts to it wait
    for that verdict and connect to the address it checked."""

    def __init__(self, guard: Guard):
        self.guard = guard
        self.lock = threading.Lock()
        self.verdicts: dict[str, Future] = {}

    def __call__(self, url: str) -> Target:
        """The guard's Target for ``url``; raises what its check raised (UnsafeURL)."""
        with self.lock:
            verdict = self.verdicts.get(url)
            first = verdict is None
            if first:
                verdict = self.verdicts[url] = Future()
        if first:
            try:
                verdict.set_result(self.guard.check(url))
            except BaseException as exc:  # noqa: BLE001 - the waiting attempts get it too, raised again
                verdict.set_exception(exc)
        return verdict.result()


def send_batch(works: list[Claim]) -> list[Sent]:
    """Make the claimed attempts at once (one thread each, up to WEBHOOK_BATCH_SIZE); return
    what each saw, in order. An attempt not done within WEBHOOK_TIMEOUT + ATTEMPT_MARGIN
    seconds (stuck outside the HTTP exchange, as in a hung DNS lookup), or cut by the task's
    soft time limit, is a failed attempt. No transaction is open meanwhile."""
    config = settings()
    context = tracing.current()  # the trace of the request that published the event, when known
    trace = context.fields() if context is not None else []
    limit = config.timeout + ATTEMPT_MARGIN
    late = Sent(Result(None, int(limit * 1000), error=f"the attempt took longer than {limit:g} s"))
    signing = signing_for(works)
    if len(works) == 1:  # no thread to hand over to
        try:
            return [attempt(works[0], signing[works[0].endpoint_id], config, trace)]
        except SoftTimeLimitExceeded:
            return [late]
    pool = _threads(config.batch_size)
    check = _Checked(config.guard)
    pending = [pool.submit(attempt, work, signing[work.endpoint_id], config, trace, check) for work in works]
    try:
        wait_for(pending, timeout=limit)
    except SoftTimeLimitExceeded:
        pass
    return [future.result() if future.done() and future.exception() is None else late for future in pending]


# -- recording ---------------------------------------------------------------------------------


def _next_delay(tries: int, result: Result) -> float | None:
    """Seconds until the next try after a failed one, or None when the schedule is spent.

    The retry schedule's entry for this try with jitter (WEBHOOK_RETRY_JITTER, a fraction);
    a 429 or 503 with ``Retry-After`` waits what the receiver asked, up to
    WEBHOOK_MAX_RETRY_AFTER.
    """
    config = settings()
    if tries >= config.max_tries:
        return None
    if result.retry_after is not None:
        return min(result.retry_after, config.max_retry_after)
    delay = config.retry_schedule[tries - 1]
    return delay * (1 + random.uniform(-config.retry_jitter, config.retry_jitter))


def _next_state(work: Claim, result: Result, now: datetime) -> dict:
    """The delivery's columns after this attempt: succeeded, failed (schedule spent, 410, a
    test send) or pending again at its next try."""
    values = {"last_status_code": result.status_code, "last_error": result.error}
    delay = None if result.succeeded or result.status_code == 410 or work.trigger == TEST else _next_delay(work.tries, result)
    if result.succeeded:
        return {**values, "status": SUCCEEDED, "finished_at": now, "next_attempt_at": None}
    if delay is None:
        return {**values, "status": FAILED, "finished_at": now, "next_attempt_at": None}
    return {**values, "status": PENDING, "finished_at": None, "next_attempt_at": now + timedelta(seconds=delay)}


def _by_delivery(column, values: dict[str, object]):
    """``CASE id WHEN ... THEN ... END`` for ``column``: one value per delivery, typed as the column."""
    return case({key: literal(value, column.type) for key, value in values.items()}, value=WebhookDelivery.id)


def record(works: list[Claim], sent: list[Sent], now: datetime | None = None) -> dict[str, str]:
    """Store the attempts and each delivery's next state together: one update of the deliveries
    (conditional on each claim's attempt number) and one multi-row insert of attempts, which on
    Postgres are one statement that commits by itself when no endpoint's health changes. An
    endpoint whose health changes (a failure, a first success after failures) is updated in
    the same transaction, and disabled on a 410 or after WEBHOOK_DISABLE_AFTER seconds of failures.

    Returns ``{delivery_id: new status}`` for the attempts recorded; a claim that was lost (the
    delivery taken over, or deleted with its endpoint) is left out and changes nothing.
    """
    now = now or utcnow()
    if not works:
        return {}
    states = {work.delivery_id: _next_state(work, done.result, now) for work, done in zip(works, sent, strict=True)}
    # A test send says nothing of the endpoint's health, nor does an attempt whose worker died.
    judged = [(work, done.result) for work, done in zip(works, sent, strict=True) if work.trigger != TEST and done.result.error != LOST]
    healthy = {work.endpoint_id for work, result in judged if result.succeeded}
    failing = {work.endpoint_id for work, result in judged if not result.succeeded} - healthy
    recovered = {work.endpoint_id for work, result in judged if result.succeeded and work.failing_since is not None}
    postgres = db.session.get_bind().dialect.name == "postgresql"
    if postgres and not (failing or recovered):  # the usual case: one statement that commits by itself
        with driver_alone() as cursor:
            recorded = _outcomes_postgres(cursor, works, sent, states, now)
        return _recorded(works, sent, states, recorded, [], now)
    if postgres:
        # The endpoints' rows before the deliveries', as an endpoint's deletion takes them: one
        # lock order, so Postgres never finds two transactions waiting on each other.
        db.session.connection().execute(
            select(WebhookEndpoint.id).where(WebhookEndpoint.id.in_(failing | recovered)).order_by(WebhookEndpoint.id).with_for_update()
        ).all()
        with driver(db.session.connection()) as raw, raw.cursor() as cursor:
            recorded = _outcomes_postgres(cursor, works, sent, states, now)
    else:
        recorded = _outcomes(works, sent, states, now)
    kept = {work.endpoint_id for work in works if work.delivery_id in recorded}
    disabled = _track_health(recovered & kept, failing & kept, [(w, r) for w, r in judged if w.delivery_id in recorded], now)
    db.session.commit()
    return _recorded(works, sent, states, recorded, disabled, now)


def _recorded(works: list[Claim], sent: list[Sent], states: dict[str, dict], recorded: set[str], disabled: list[str], now: datetime) -> dict[str, str]:
    """After the commit: count and log each attempt recorded, fan out the endpoint-disabled
    messages; return ``{delivery_id: new status}``."""
    for work, done in zip(works, sent, strict=True):
        if work.delivery_id not in recorded:
            log.info("webhook attempt not recorded: the claim was lost", extra={"delivery_id": work.delivery_id})
            continue
        result = done.result
        metrics.WEBHOOK_ATTEMPTS.labels("succeeded" if result.succeeded else "failed").inc()
        if result.succeeded and work.trigger != TEST and work.created_at is not None:
            metrics.WEBHOOK_LAG_SECONDS.observe(max((now - work.created_at).total_seconds(), 0.0))
        log.info(
            "webhook attempt",
            extra={
                "delivery_id": work.delivery_id,
                "endpoint_id": work.endpoint_id,
                "attempt": work.number,
                "status_code": result.status_code,
                "duration_ms": result.duration_ms,
                "outcome": states[work.delivery_id]["status"],
                "request_id": work.request_id,
            },
        )
    if disabled:
        messages.fan_out_later(disabled)
    return {delivery_id: states[delivery_id]["status"] for delivery_id in recorded}


def _attempt_row(work: Claim, done: Sent, now: datetime) -> dict:
    return {
        "id": new_id("atm"),
        "delivery_id": work.delivery_id,
        "endpoint_id": work.endpoint_id,
        "number": work.number,
        "trigger": work.trigger,
        "url": work.url,
        "address": done.address,
        "status_code": done.result.status_code,
        "succeeded": done.result.succeeded,
        "duration_ms": done.result.duration_ms,
        # Postgres text has no NUL
        "response_excerpt": None if done.result.excerpt is None else done.result.excerpt.replace("\x00", "\ufffd"),
        "error": done.result.error,
        "request_id": work.request_id,
        "created_at": now,
    }


def _outcomes(works: list[Claim], sent: list[Sent], states: dict[str, dict], now: datetime) -> set[str]:
    """Write the deliveries' next states (one UPDATE, conditional on each claim's attempt
    number) and the attempts of those it changed (one multi-row INSERT), in the session's
    transaction; return the ids of the deliveries recorded."""
    columns = ("status", "next_attempt_at", "finished_at", "last_status_code", "last_error")
    recorded = set(
        db.session.connection().execute(
            update(WebhookDelivery)
            .where(
                tuple_(WebhookDelivery.id, WebhookDelivery.attempts).in_([(work.delivery_id, work.number) for work in works]),
                WebhookDelivery.status == SENDING,
            )
            .values(
                lease_expires_at=None,
                trigger=SCHEDULED,
                **{
                    name: _by_delivery(getattr(WebhookDelivery, name), {key: state[name] for key, state in states.items()})
                    for name in columns
                },
            )
            .returning(WebhookDelivery.id)
        ).scalars()
    )
    rows = [_attempt_row(work, done, now) for work, done in zip(works, sent, strict=True) if work.delivery_id in recorded]
    if rows:
        db.session.connection().execute(insert(WebhookAttempt), rows)
    return recorded


# Postgres: the same writes as one statement, whatever the batch's size (its values travel as
# arrays): the deliveries' UPDATE in a CTE, and the INSERT of attempts for the rows it changed.
# Run on psycopg's cursor, as the claim's statements are (``_claim_postgres``).
_OUTCOMES = DriverStatement.of(text("""
WITH outcome AS (
    SELECT * FROM unnest(CAST(:ids AS text[]), CAST(:numbers AS integer[]), CAST(:statuses AS text[]),
                         CAST(:due AS timestamp[]), CAST(:finished AS timestamp[]), CAST(:codes AS integer[]),
                         CAST(:errors AS text[]))
        AS outcome(id, number, status, next_attempt_at, finished_at, status_code, error)
), recorded AS (
    UPDATE webhook_deliveries AS d
    SET status = outcome.status, next_attempt_at = outcome.next_attempt_at, finished_at = outcome.finished_at,
        last_status_code = outcome.status_code, last_error = outcome.error, lease_expires_at = NULL, trigger = :scheduled
    FROM outcome
    WHERE d.id = outcome.id AND d.attempts = outcome.number AND d.status = :sending
    RETURNING d.id
)
INSERT INTO webhook_attempts (id, delivery_id, endpoint_id, number, trigger, url, address, status_code, succeeded,
                              duration_ms, response_excerpt, error, request_id, created_at)
SELECT a.id, a.delivery_id, a.endpoint_id, a.number, a.trigger, a.url, a.address, a.status_code, a.succeeded,
       a.duration_ms, a.response_excerpt, a.error, a.request_id, :now
FROM unnest(CAST(:a_ids AS text[]), CAST(:a_endpoints AS text[]), CAST(:a_triggers AS text[]), CAST(:a_urls AS text[]),
            CAST(:a_addresses AS text[]), CAST(:a_codes AS integer[]), CAST(:a_succeeded AS boolean[]),
            CAST(:a_durations AS integer[]), CAST(:a_excerpts AS text[]), CAST(:a_errors AS text[]),
            CAST(:a_request_ids AS text[]), CAST(:ids AS text[]), CAST(:numbers AS integer[]))
    AS a(id, endpoint_id, trigger, url, address, status_code, succeeded, duration_ms, response_excerpt, error,
         request_id, delivery_id, number)
JOIN recorded ON recorded.id = a.delivery_id
RETURNING delivery_id
"""))


def _outcomes_postgres(cursor, works: list[Claim], sent: list[Sent], states: dict[str, dict], now: datetime) -> set[str]:
    """``_outcomes`` on Postgres, as one statement on psycopg's ``cursor`` (in the caller's
    transaction, or committing by itself)."""
    rows = [_attempt_row(work, done, now) for work, done in zip(works, sent, strict=True)]
    order = [states[work.delivery_id] for work in works]
    values = {
        "ids": [work.delivery_id for work in works],
        "numbers": [work.number for work in works],
        "statuses": [state["status"] for state in order],
        "due": [naive_utc(state["next_attempt_at"]) for state in order],
        "finished": [naive_utc(state["finished_at"]) for state in order],
        "codes": [state["last_status_code"] for state in order],
        "errors": [state["last_error"] for state in order],
        "scheduled": SCHEDULED,
        "sending": SENDING,
        "now": now,
        **{f"a_{key}": [row[column] for row in rows] for key, column in (
            ("ids", "id"), ("endpoints", "endpoint_id"), ("triggers", "trigger"), ("urls", "url"),
            ("addresses", "address"), ("codes", "status_code"), ("succeeded", "succeeded"), ("durations", "duration_ms"),
            ("excerpts", "response_excerpt"), ("errors", "error"), ("request_ids", "request_id"),
        )},
    }
    return {row[0] for row in cursor.execute(_OUTCOMES.sql, _OUTCOMES.params(values))}


def _track_health(recovered: set[str], failing: set[str], judged: list[tuple[Claim, Result]], now: datetime) -> list[str]:
    """Clear the failure record of endpoints that answered again; extend (or start) it for those
    that failed, and disable those that answered 410 or have failed for WEBHOOK_DISABLE_AFTER
    seconds. Returns the ids of the ``webhook.endpoint.disabled`` messages recorded (in the
    caller's transaction)."""
    if recovered:
        db.session.connection().execute(
            update(WebhookEndpoint).where(WebhookEndpoint.id.in_(recovered), WebhookEndpoint.failing_since.is_not(None)).values(failing_since=None)
        )
    if not failing:
        return []
    # A run of failures is continuous: a silence longer than the longest retry gap (nothing
    # was sent, so nothing failed) starts a new run rather than extending the old one.
    silence = now - timedelta(seconds=_longest_gap())
    restart = or_(WebhookEndpoint.failing_since.is_(None), WebhookEndpoint.last_failure_at.is_(None), WebhookEndpoint.last_failure_at < silence)
    rows = db.session.connection().execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id.in_(failing))
        .values(failing_since=case((restart, literal(now, WebhookEndpoint.failing_since.type)), else_=WebhookEndpoint.failing_since), last_failure_at=now)
        .returning(WebhookEndpoint.id, WebhookEndpoint.consumer_id, WebhookEndpoint.url, WebhookEndpoint.failing_since, WebhookEndpoint.disabled)
    ).all()
    gone = {work.endpoint_id for work, result in judged if result.status_code == 410}
    made = []
    for endpoint in rows:
        if endpoint.disabled:
            continue
        if endpoint.id in gone:
            reason = "the receiver answered 410 Gone"
        elif endpoint.failing_since is not None and endpoint.failing_since <= now - timedelta(seconds=settings().disable_after):
            reason = f"every attempt failed since {isoformat(endpoint.failing_since)}"
        else:
            continue
        message_id = disable(endpoint, reason, now)
        if message_id is not None:
            made.append(message_id)
    return made


def _longest_gap() -> float:
    """The longest a failing delivery waits between two tries (seconds): the longest retry
    delay with its jitter, plus a dispatch interval and a lease for the try itself."""
    config = settings()
    return max((*config.retry_schedule, 0.0)) * (1 + config.retry_jitter) + config.dispatch_interval + config.lease


def disable(endpoint, reason: str, now: datetime) -> str | None:
    """Disable ``endpoint`` (a row with ``id``, ``consumer_id``, ``url``, ``failing_since``),
    fail its pending deliveries, and record a ``webhook.endpoint.disabled`` message for its
    consumer (fanned out to its other endpoints after the caller commits). Returns the message
    id, or None when another attempt disabled it first. In the caller's transaction; the
    conditional write decides between attempts recorded at the same moment."""
    done = db.session.connection().execute(
        update(WebhookEndpoint)
        .where(WebhookEndpoint.id == endpoint.id, WebhookEndpoint.disabled.is_(False))
        .values(disabled=True, disabled_reason=reason, disabled_at=now)
    ).rowcount
    if not done:
        return None
    db.session.connection().execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == PENDING)
        .values(status=FAILED, finished_at=now, next_attempt_at=None, last_error=f"endpoint disabled: {reason}"[:500])
    )
    data = {"endpoint_id": endpoint.id, "url": endpoint.url, "reason": reason, "failing_since": isoformat(endpoint.failing_since)}
    message = messages.new_message(
        endpoint.consumer_id, messages.ENDPOINT_DISABLED, data, event_id=f"{endpoint.id}.disabled.{int(now.timestamp() * 1000)}", created_at=now
    )
    db.session.add(message)
    db.session.flush()
    log.warning("webhook endpoint disabled", extra={"endpoint_id": endpoint.id, "reason": reason})
    return message.id


# -- the worker's loop -------------------------------------------------------------------------


def deliver(ids: Sequence[str] | None = None, drain: float = DRAIN) -> dict[str, int]:
    """Claim, send and record batches of due deliveries (the first only among ``ids`` when
    given: the ones a fan-out or a redelivery just made due) while a batch may have left some
    due, for up to ``drain`` seconds; then, if work was still being found, send a deliver
    message to carry on. Returns counts of the new statuses.

    Work that becomes due later comes with a message of its own (a fan-out, a redelivery,
    beat's dispatch of retries), so a batch that took everything it was asked for and filled
    no endpoint's share ends the loop, once its endpoints have no due delivery with a free slot
    (``_claimable``: one read instead of a claim that finds nothing)."""
    config = settings()
    started = time.monotonic()
    counts: dict[str, int] = {}
    helped = False
    sent_to: set[str] = set()  # the last batch's endpoints
    while True:
        works = claim(config.batch_size, ids)
        if not works:
            if ids is not None:  # none of those is due any more: the rest may be
                ids = None
                continue
            # A claim skips an endpoint another worker is claiming at that moment (which may
            # count slots this one is about to free, or take only its own deliveries): if one
            # this worker just freed still has deliveries due, hand them on at once rather than
            # leave them to beat's next pass.
            if sent_to and _claimable(sent_to):
                wake()
            return counts
        left = _left_due(works, ids, config)
        if left >= _share(config) and not helped:
            # Another worker's batch can be sent while this one's is recorded.
            helped = wake()
        for status in record(works, send_batch(works)).values():
            counts[status] = counts.get(status, 0) + 1
        if time.monotonic() - started >= drain:
            wake()
            return counts
        sent_to = {work.endpoint_id for work in works}
        if not left and not _claimable(sent_to):
            return counts
        ids = None


def _left_due(works: list[Claim], ids: Sequence[str] | None, config) -> int:
    """How many due deliveries the claim that took ``works`` may have left behind: those of
    ``ids`` it did not take; without ``ids``, a share's worth when it filled the batch or an
    endpoint's share (there may be more), else none."""
    if ids is not None:
        return len(set(ids)) - len(works)
    if len(works) >= config.batch_size or max(Counter(work.endpoint_id for work in works).values()) >= _share(config):
        return _share(config)
    return 0


def _claimable(endpoint_ids: set[str]) -> bool:
    """Whether one of these endpoints (enabled) has a delivery pending and due now, and a free
    slot: one statement, on Postgres autocommitted on psycopg's cursor."""
    postgres = db.engine.dialect.name == "postgresql"
    params = {"endpoints": list(endpoint_ids), "now": utcnow(), "cap": settings().endpoint_concurrency}
    if postgres:
        statement = _claimable_statement(True)
        with driver_alone() as cursor:
            return cursor.execute(statement.sql, statement.params(params)).fetchone() is not None
    found = db.session.connection().execute(_claimable_statement(False), params).first()
    db.session.rollback()
    return found is not None


@functools.lru_cache(maxsize=2)
def _claimable_statement(postgres: bool):
    """``_claimable``'s statement, built once: compiled for psycopg's cursor on Postgres."""
    d, now = WebhookDelivery, bindparam("now", type_=UTCDateTime())
    busy = select(func.count()).where(in_flight(WebhookEndpoint.id, now)).correlate(WebhookEndpoint).scalar_subquery()
    statement = (
        select(WebhookEndpoint.id)
        .where(
            among(WebhookEndpoint.id, "endpoints", postgres),
            WebhookEndpoint.disabled.is_(False),
            select(d.id).where(d.endpoint_id == WebhookEndpoint.id, d.status == PENDING, d.next_attempt_at <= now).exists(),
            busy < bindparam("cap", type_=Integer()),
        )
        .limit(1)
    )
    return DriverStatement.of(statement) if postgres else statement


def wake(ids: Sequence[str] | None = None) -> bool:
    """Ask a worker to deliver what is due now (``ids`` first), rather than at beat's next
    dispatch; returns False when the message could not be sent (beat's pass finds the work)."""
    try:
        queue.send(queue.DELIVER, (list(ids),) if ids else ())
        return True
    except Exception:
        log.warning("deliver enqueue failed; the dispatcher will send it", exc_info=True)
        return False
