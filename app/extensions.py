"""Extension singletons, created here and bound to an app in ``init_app``."""
from __future__ import annotations

import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import psycopg
import redis
from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from psycopg.rows import namedtuple_row
from psycopg.types.json import Json
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import ARRAY, JSON, String, Table, any_, bindparam, event, insert
from sqlalchemy.dialects.postgresql import psycopg as postgresql_psycopg
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.sql import Executable


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
migrate = Migrate()

# Redis is short-fused: when it is slow or down the gateway degrades (breakers fall back
# to closed) rather than holding a request for the default of no timeout at all.
REDIS_SOCKET_TIMEOUT = 0.5  # seconds


def new_redis(url: str, socket_timeout: float = REDIS_SOCKET_TIMEOUT) -> redis.Redis:
    """A Redis client for the request path: ``socket_timeout`` seconds per command, no retries.

    redis-py retries a failed command three times with exponential backoff by default,
    seconds per command against a hung server; the gateway's callers back off themselves.
    ``rediss://`` URLs do not verify the server certificate unless the URL asks
    (``?ssl_cert_reqs=required``): Heroku Redis presents a self-signed one.
    """
    options = {}
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        options["ssl_cert_reqs"] = "none"
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
        **options,
    )


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_connection, connection_record) -> None:
    """On the embedded default the web process, the worker and beat write one SQLite file:
    WAL lets readers go on during a write, and a busy timeout makes writers queue for the
    lock (seconds) instead of failing at once with "database is locked"."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=15000")
        cursor.close()


def lock_rows(query) -> list:
    """The rows of ``query``, locked with FOR UPDATE SKIP LOCKED on Postgres so that two beats
    (or a beat and a slow one) never act on the same rows; SQLite has one writer anyway."""
    if db.session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(db.session.execute(query).scalars())


# PostgreSQL: data the server has not acknowledged after this long (a ping or a query sent to
# a host that vanished) closes the connection, instead of waiting out the kernel's
# retransmissions (about 15 minutes). A query running long on a live server sends nothing
# unacknowledged meanwhile, so it is not cut short.
TCP_USER_TIMEOUT = 10  # seconds


Row = TypeVar("Row")


def insert_once(key: str | None, earlier: Callable[[], Row | None], same: Callable[[Row], Row], write: Callable[[], Row]) -> tuple[Row, bool]:
    """The idempotent insert: return ``(row, created)``.

    ``write()`` inserts and commits the new row. With a ``key`` (an Idempotency-Key, an event
    id) that a unique constraint guards, a refused insert (IntegrityError: the key was used
    before, or by a request that committed first) rolls the session back, and the row
    ``earlier()`` finds under the key is the answer, checked by ``same(row)`` (which returns it,
    or raises when the key was used for another request). Insert first, look up only on a
    conflict: a new key, the usual case, costs no query.
    """
    try:
        return write(), True
    except IntegrityError:
        db.session.rollback()
        found = earlier() if key is not None else None
        if found is None:
            raise
        return same(found), False


@contextmanager
def committed_alone() -> Iterator[Connection]:
    """A connection of its own on which each statement commits by itself (autocommit): a write
    that is one statement needs no BEGIN and COMMIT round trips around it."""
    with db.engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


# -- statements on psycopg's cursor (Postgres) ----------------------------------------------------
# The hottest statements (a webhook batch's claim and record, an event's and a job's insert) are
# built with SQLAlchemy Core, compiled once, and run on psycopg's cursor: through SQLAlchemy's
# execution (parameter and result processing, events, its transaction bookkeeping) the same
# statements cost about twice the CPU (a claim 0.65 against 0.32 ms; bench/README.md).


@dataclass(frozen=True)
class DriverStatement:
    """A Core statement compiled once for Postgres' psycopg: its SQL text (``%(name)s``
    parameters), its constants' values, and its JSON parameters, which ``params`` encodes as
    SQLAlchemy's JSON type would (None as JSON ``null`` unless the type says ``none_as_null``).
    Lists are bound as arrays: use ``= any_(...)``, not an expanding ``IN``."""

    sql: str
    constants: dict
    json: frozenset[str]
    null_json: frozenset[str]  # JSON parameters whose None is SQL NULL

    @classmethod
    def of(cls, statement: Executable) -> DriverStatement:
        compiled = statement.compile(dialect=postgresql_psycopg.dialect())
        json = {name: bind.type for name, bind in ((b.key, b) for b in compiled.binds.values()) if isinstance(bind.type, JSON)}
        return cls(compiled.string, dict(compiled.params), frozenset(json), frozenset(name for name, kind in json.items() if kind.none_as_null))

    def params(self, values: dict) -> dict:
        """The parameters for ``values``: the constants, times as the naive UTC the columns
        hold (UTCDateTime), JSON values encoded."""
        bound = dict(self.constants)
        for key, value in values.items():
            if isinstance(value, datetime):
                value = naive_utc(value)
            elif key in self.json and not (value is None and key in self.null_json):
                value = Json(value)
            bound[key] = value
        return bound


def among(column, name: str, postgres: bool):
    """``column`` is one of the list bound as ``name``: ``= ANY(array)`` on Postgres (one
    parameter, so the statement compiles once to a fixed text: DriverStatement), an expanding
    ``IN`` elsewhere."""
    if postgres:
        return column == any_(bindparam(name, type_=ARRAY(String())))
    return column.in_(bindparam(name, expanding=True))


def naive_utc(value: datetime | None) -> datetime | None:
    """``value`` as the columns hold times (``app.models.base.UTCDateTime``): UTC, without a zone."""
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


@functools.lru_cache(maxsize=64)
def driver_insert(table: Table, columns: tuple[str, ...]) -> DriverStatement:
    """``INSERT INTO table (columns) VALUES (...)``, each value a parameter named as its column."""
    return DriverStatement.of(insert(table).values({name: bindparam(name, type_=table.c[name].type) for name in columns}))


@contextmanager
def driver(conn: Connection | PoolProxiedConnection) -> Iterator[psycopg.Connection]:
    """psycopg's connection under ``conn`` (a Connection, or the pool's own proxy from
    ``engine.raw_connection()``; Postgres). Its errors are raised as SQLAlchemy raises them (an
    IntegrityError, an OperationalError, ...: ``DBAPIError.instance``), and a lost connection
    is invalidated, so that the pool does not hand it out again."""
    raw = conn.driver_connection if isinstance(conn, PoolProxiedConnection) else conn.connection.driver_connection
    try:
        yield raw
    except psycopg.Error as exc:
        lost = db.engine.dialect.is_disconnect(exc, raw, None)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(None, None, exc, psycopg.Error, connection_invalidated=lost) from exc


@contextmanager
def driver_transaction() -> Iterator[psycopg.Cursor]:
    """A cursor (rows as named tuples) in a transaction of its own on a pooled connection
    (Postgres): committed when the block ends, rolled back when it raises; errors as ``driver``."""
    with db.engine.connect() as conn, driver(conn) as raw, raw.transaction(), raw.cursor(row_factory=namedtuple_row) as cursor:
        yield cursor


@contextmanager
def driver_alone() -> Iterator[psycopg.Cursor]:
    """A cursor on which each statement commits by itself (autocommit), on a pooled connection
    switched back when the block ends (Postgres): a write that is one statement needs no BEGIN
    and COMMIT round trips around it. Errors as ``driver``."""
    pooled = db.engine.raw_connection()  # the pool's connection, without a SQLAlchemy Connection around it
    try:
        with driver(pooled) as raw:
            raw.autocommit = True
            try:
                with raw.cursor() as cursor:
                    yield cursor
            finally:
                with contextlib.suppress(psycopg.Error):  # a lost connection is invalidated by driver()
                    raw.autocommit = False
    finally:
        pooled.close()


# Sent before a statement in the same simple query: Postgres runs the statements of one simple
# query as one implicit transaction ("Multiple Statements in a Simple Query", protocol docs), so
# SET LOCAL applies to that statement's commit alone, in the same round trip.
_ASYNC_COMMIT = "SET LOCAL synchronous_commit = off; "


def insert_alone(table: Table, values: dict, synchronous_commit: bool = True) -> None:
    """Insert one row that commits by itself: on Postgres one round trip on psycopg's cursor
    (``driver_insert``, ``driver_alone``), elsewhere SQLAlchemy Core (``committed_alone``).
    Raises IntegrityError on a conflict.

    With ``synchronous_commit`` False (Postgres) the commit does not wait for its WAL to reach
    the disk (Postgres, "Asynchronous Commit"): the row is committed and visible at once, and
    on disk within three times ``wal_writer_delay`` (0.6 s by default); a crash of Postgres
    itself within that window loses it. The statement is then bound by psycopg on the client
    (``ClientCursor``, its values quoted by libpq) and sent with ``_ASYNC_COMMIT``."""
    if db.engine.dialect.name != "postgresql":
        with committed_alone() as conn:
            conn.execute(insert(table), values)
        return
    statement = driver_insert(table, tuple(values))
    with driver_alone() as cursor:
        if synchronous_commit:
            cursor.execute(statement.sql, statement.params(values))
        else:
            with psycopg.ClientCursor(cursor.connection) as client:
                client.execute(_ASYNC_COMMIT + statement.sql, statement.params(values))


def engine_options(config: dict) -> dict:
    """SQLALCHEMY_ENGINE_OPTIONS for the configured database.

    On PostgreSQL a connection attempt gives up after DATABASE_CONNECT_TIMEOUT seconds
    (libpq's ``connect_timeout``: a down database refuses at once, an unreachable one would
    otherwise hold the request's thread for minutes) and an unanswered send after
    TCP_USER_TIMEOUT (libpq's ``tcp_user_timeout``, milliseconds). ``connect_args`` given in
    the configuration win over these. (Pooled connections are tested by ``ping_when_idle``.)

    The pool keeps as many connections as a web process has threads (WEB_THREADS, at least
    SQLAlchemy's 5): with fewer, the threads' concurrent checkouts overflow it, and each
    overflow connection is opened for one statement and closed again on its return (a new
    Postgres backend each time).
    """
    options = dict(config["SQLALCHEMY_ENGINE_OPTIONS"])
    if config["SQLALCHEMY_DATABASE_URI"].startswith("postgresql"):
        options.setdefault("pool_size", max(5, int(config["WEB_THREADS"])))
        options["connect_args"] = {
            "connect_timeout": max(2, int(config["DATABASE_CONNECT_TIMEOUT"])),
            "tcp_user_timeout": TCP_USER_TIMEOUT * 1000,
            **options.get("connect_args", {}),
        }
    return options


def ping_when_idle(engine: Engine, after: float) -> None:
    """Test a pooled connection before use when it was idle longer than ``after`` seconds:
    SQLAlchemy's ``pool_pre_ping`` recipe ("Disconnect Handling - Pessimistic", a custom ping on
    checkout), but without its round trip on every checkout of a busy pool. A connection that
    fails the test is replaced (the pool retries the checkout); one used within ``after``
    seconds is trusted, and a database that went away meanwhile fails that one statement
    (which invalidates the pool's older connections too)."""

    @event.listens_for(engine, "checkin")
    def idle_from(dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def test_if_idle(dbapi_connection, record, proxy) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < after:  # new, or in steady use
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the driver's error for a dead connection, whatever its class
            raise DisconnectionError(f"a pooled connection failed its test: {exc}") from exc


def init_app(app: Flask) -> None:
    """Bind the database, migrations and (when ``REDIS_URL`` is set) a Redis client. The models
    register their tables with ``db.metadata`` when ``app.models`` is imported (create_app does)."""
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(app.config)
    db.init_app(app)
    # Registered after Flask-SQLAlchemy's own, so it runs first (teardowns run in reverse).
    app.teardown_appcontext(end_session)
    with app.app_context():
        for engine in db.engines.values():
            ping_when_idle(engine, float(app.config["DATABASE_PING_AFTER"]))
    migrate.init_app(app, db, directory=str(Path(app.root_path).parent / "migrations"))
    url = app.config["REDIS_URL"]
    app.extensions["redis"] = new_redis(url) if url else None


def end_session(exc: BaseException | None) -> None:
    """teardown_appcontext: end the request's session. A connection the server dropped while
    the request ran (a shutdown, a failover) fails the ROLLBACK that ends it; the request was
    answered already, so the connection is invalidated instead of turning that answer into a 500."""
    try:
        db.session.remove()
    except DBAPIError:
        if db.session.registry.has():
            with contextlib.suppress(DBAPIError):
                db.session.registry().invalidate()
        db.session.registry.clear()


def redis_client(app: Flask) -> redis.Redis | None:
    """Return the app's Redis client, or None on the embedded default."""
    return app.extensions["redis"]
