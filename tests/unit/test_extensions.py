"""Pooled database connections: tested on checkout only after they were idle."""
from __future__ import annotations

import time

from sqlalchemy import create_engine, text
from sqlalchemy.pool import QueuePool

from app.extensions import ping_when_idle


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
