"""Pooled database connections: tested on checkout only after they were idle; statements on psycopg's cursor."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest
from flask import Flask
from sqlalchemy import (
    JSON,
    Column,
    LargeBinary,
    MetaData,
    String,
    Table,
    create_engine,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.pool import QueuePool

from app.extensions import db, driver, insert_alone, ping_when_idle
from app.models.base import UTCDateTime


def test_a_pooled_connection_is_tested_only_after_it_was_idle_and_replaced_when_the_test_fails(tmp_path, monkeypatch):
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", poolclass=QueuePool, pool_size=1)
    ping_when_idle(engine, after=0.2)
    tested, failing = [], []
    real = engine.dialect.do_ping

    def ping(dbapi_connection):
        tested.append(dbapi_connection)
        if failing:
            raise engine.dialect.loaded_dbapi.OperationalError("server closed the connection unexpectedly")
        return real(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", ping)
    try:
        def used():
            """The driver's connection a checkout got (kept referenced: identities stay apart)."""
            with engine.connect() as connection:
                assert connection.execute(text("SELECT 1")).scalar_one() == 1
                return connection.connection.dbapi_connection

        first = used()  # a new connection: not tested
        assert used() is first and tested == []  # back at once: trusted
        time.sleep(0.3)
        assert used() is first and tested == [first]  # idle past 0.2 s: tested, and kept
        time.sleep(0.3)
        failing.append(True)
        replaced = used()  # failed its test: the pool made another
        assert tested[-1] is first and replaced is not first
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("synchronous_commit", [True, False], ids=["synchronous", "asynchronous"])
def test_statements_on_psycopgs_cursor_store_what_core_would_and_fail_as_sqlalchemy_does(postgres_database, synchronous_commit):
    """``insert_alone`` on Postgres runs on psycopg's cursor: the row reads back as a Core
    insert's would (JSON, SQL NULL for a ``none_as_null`` column, times as naive UTC), a
    conflict is SQLAlchemy's IntegrityError (what ``insert_once`` catches), and a connection
    the server dropped is an OperationalError that is not handed out again. Without a
    synchronous commit (values bound on the client) the same holds, and the pooled connection
    keeps the server's setting for the next statement."""
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=postgres_database.replace("postgresql://", "postgresql+psycopg://", 1))
    db.init_app(app)
    metadata = MetaData()
    table = Table(
        "driver_probe", metadata,
        Column("id", String(16), primary_key=True),
        Column("data", JSON),
        Column("nothing", JSON(none_as_null=True)),
        Column("at", UTCDateTime()),
        Column("body", LargeBinary),
    )
    with app.app_context():
        metadata.create_all(db.engine)
        at = datetime(2026, 12, 7, 13, 0, 1, 500000, tzinfo=timezone(timedelta(hours=2)))
        insert_alone(table, {"id": "a", "data": {"k": [1, "é", "it's; DROP"]}, "nothing": None, "at": at, "body": b"\x00\xff'"}, synchronous_commit)
        insert_alone(table, {"id": "b", "data": None, "nothing": None, "at": None, "body": None}, synchronous_commit)
        with db.engine.connect() as conn:
            rows = {row.id: row for row in conn.execute(select(table, table.c.data.is_(None).label("sql_null"), text("nothing IS NULL AS nothing_null")))}
            setting = conn.exec_driver_sql("SHOW synchronous_commit").scalar_one()
        assert setting == "on"  # SET LOCAL lasted for its own statement only
        assert rows["a"].data == {"k": [1, "é", "it's; DROP"]} and rows["a"].body == b"\x00\xff'"
        assert rows["a"].at == at.astimezone(UTC)
        assert rows["a"].nothing_null and rows["b"].nothing_null  # none_as_null: SQL NULL
        assert rows["b"].data is None and not rows["b"].sql_null  # JSON null, as Core stores None
        with pytest.raises(IntegrityError):
            insert_alone(table, {"id": "a", "data": {}, "nothing": None, "at": None, "body": None}, synchronous_commit)

        with db.engine.connect() as conn:
            backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with psycopg.connect(postgres_database, autocommit=True) as killer:  # outside the pool
            killer.execute("SELECT pg_terminate_backend(%s)", (backend,))
        with pytest.raises(OperationalError) as failed, db.engine.connect() as conn, driver(conn) as raw:
            raw.execute("SELECT 1")  # on the pooled connection the server dropped
        assert failed.value.connection_invalidated
        insert_alone(table, {"id": "c", "data": {}, "nothing": None, "at": None, "body": None})  # a new connection
        metadata.drop_all(db.engine)
        db.engine.dispose()


def test_a_written_row_reads_like_the_models_instance_even_first_thing_in_a_new_process():
    """``written`` makes the object a submission answers with; in a fresh process (a gunicorn
    worker's first request) the mappers are not configured yet, and it must configure them as
    ``Job(...)`` would. Run in a new interpreter, where nothing has touched the ORM before."""
    code = (
        "from app.models import Job; from app.models.base import written\n"
        "job = written(Job, {'id': 'job_1', 'status': 'succeeded', 'progress': 100})\n"
        "print(job.id, job.status, job.progress, job.started_at, job.final)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["job_1", "succeeded", "100", "None", "True"]


@pytest.mark.postgres
def test_every_thread_of_a_web_process_keeps_its_postgres_connection_between_requests(postgres_database):
    """WEB_THREADS threads holding a connection at once, twice: the second time they get the
    same server backends back (the pool kept them), none opened for one checkout and closed."""
    from app.extensions import engine_options

    app = Flask(__name__)
    url = postgres_database.replace("postgresql://", "postgresql+psycopg://", 1)
    config = {"SQLALCHEMY_DATABASE_URI": url, "SQLALCHEMY_ENGINE_OPTIONS": {}, "WEB_THREADS": 8, "DATABASE_CONNECT_TIMEOUT": 5}
    app.config.update(SQLALCHEMY_DATABASE_URI=url, SQLALCHEMY_ENGINE_OPTIONS=engine_options(config))
    db.init_app(app)

    def backends() -> set[int]:
        together = threading.Barrier(8)
        found: list[int] = []

        def hold() -> None:
            with app.app_context(), db.engine.connect() as conn:
                found.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
                together.wait(timeout=10)  # all eight checked out at once

        threads = [threading.Thread(target=hold) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return set(found)

    with app.app_context():
        try:
            first = backends()
            assert len(first) == 8
            assert backends() == first
        finally:
            db.engine.dispose()


@pytest.mark.postgres
def test_a_request_whose_connection_the_server_dropped_is_still_answered(make_app, postgres_database):
    """PostgreSQL shutting down (or failing over) while a request holds a connection: the
    ROLLBACK that ends the request's session fails, and the answer already made still goes out."""
    from sqlalchemy import text

    app = make_app(SQLALCHEMY_DATABASE_URI=postgres_database.replace("postgresql://", "postgresql+psycopg://", 1))
    admin = postgres_database  # another connection, as the server's administrator would be

    from app.auth.views import policy

    @app.get("/_gateway/held")
    @policy("none")
    def held():
        pid = db.session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with psycopg.connect(admin, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        return {"backend": pid}

    answered = app.test_client().get("/_gateway/held")
    assert answered.status_code == 200 and answered.json["backend"] > 0
    # The dropped connection is not handed out again: the next request works.
    with app.app_context():
        assert db.session.execute(text("SELECT 1")).scalar_one() == 1
        db.session.remove()
