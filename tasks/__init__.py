"""Celery wiring: ``celery_init_app`` binds a Celery app whose tasks run inside the Flask app context."""
from __future__ import annotations

from celery import Celery, Task
from flask import Flask

from tasks.schedule import BEAT_SCHEDULE


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app for ``app`` and store it in ``app.extensions["celery"]``.

    The broker is ``REDIS_URL`` when set, else kombu's SQLAlchemy transport over SQLite
    under ``instance/`` (the embedded default). Reliability settings follow the worker
    rules in DESIGN: late acks, re-queue on a lost worker, prefetch 1, results ignored
    (job state lives in SQL, never in a result backend).
    """

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    broker_url = app.config["CELERY_BROKER_URL"]
    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.conf.update(
        broker_url=broker_url,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=300,
        task_time_limit=330,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule=BEAT_SCHEDULE,
        timezone="UTC",
    )
    if broker_url.startswith(("redis://", "rediss://")):
        # Longer than the longest task, or Redis hands an unacked task to a second worker.
        # (kombu's SQLAlchemy transport passes these options to create_engine, so only Redis.)
        celery_app.conf.broker_transport_options = {"visibility_timeout": 3600}
    celery_app.conf.update(app.config.get("CELERY", {}))
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app
