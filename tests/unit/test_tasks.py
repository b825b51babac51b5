"""tasks/__init__.py: the embedded broker's queues exist before web, worker and beat use them."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def queues_in(broker: Path) -> list[str]:
    with sqlite3.connect(broker) as connection:
        return sorted(name for (name,) in connection.execute("SELECT name FROM kombu_queue"))


# kombu's SQLAlchemy transport still declares a relationship with the deprecated ``noload``.
@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_an_app_on_the_embedded_broker_declares_its_queues(make_app, tmp_path):
    broker = tmp_path / "broker.sqlite"

    make_app(CELERY_BROKER_URL=f"sqla+sqlite:///{broker}")
    make_app(CELERY_BROKER_URL=f"sqla+sqlite:///{broker}")  # and again: nothing to do

    assert queues_in(broker) == ["celery", "jobs", "webhooks"]


def test_processes_starting_together_on_a_fresh_broker_all_get_a_working_one(tmp_path):
    """Web, worker and beat start at once on the embedded default: each must be able to publish."""
    broker = tmp_path / "broker.sqlite"
    env = {
        **os.environ,
        "GATEWAY_CELERY_BROKER_URL": f"sqla+sqlite:///{broker}",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
        "GATEWAY_CONFIG": str(ROOT / "gateway.yaml"),
        "REDIS_URL": "",
        "PYTHONWARNINGS": "ignore",
    }
    code = "from app import create_app; app = create_app(); app.extensions['celery'].send_task('celery.backend_cleanup')"
    processes = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(6)
    ]
    outputs = [process.communicate(timeout=60)[0].decode(errors="replace") for process in processes]

    assert [process.returncode for process in processes] == [0] * 6, "\n".join(outputs)
    assert queues_in(broker) == ["celery", "jobs", "webhooks"]
    with sqlite3.connect(broker) as connection:
        assert connection.execute("SELECT count(*) FROM kombu_message").fetchone() == (6,)


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
def test_the_embedded_brokers_folder_is_created_on_a_fresh_checkout(make_app, tmp_path):
    broker = tmp_path / "not" / "there" / "yet" / "broker.sqlite"

    make_app(CELERY_BROKER_URL=f"sqla+sqlite:///{broker}")

    assert queues_in(broker) == ["celery", "jobs", "webhooks"]
