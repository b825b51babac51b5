"""tasks/__init__.py: the ``declare-queues`` command that readies the broker before the processes start."""
from __future__ import annotations

import sqlite3

import pytest


# kombu's SQLAlchemy transport still declares a relationship with the deprecated ``noload``.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_declare_queues_creates_the_embedded_brokers_queues_once(make_app, tmp_path):
    broker = tmp_path / "broker.sqlite"
    app = make_app(CELERY_BROKER_URL=f"sqla+sqlite:///{broker}")
    runner = app.test_cli_runner()

    first = runner.invoke(args=["declare-queues"])
    again = runner.invoke(args=["declare-queues"])

    assert first.exit_code == 0, first.output
    assert again.exit_code == 0, again.output
    assert first.output.strip() == "declared celery, jobs"
    with sqlite3.connect(broker) as connection:
        names = sorted(name for (name,) in connection.execute("SELECT name FROM kombu_queue"))
    assert names == ["celery", "jobs"]
