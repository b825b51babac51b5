"""Celery wiring: ``celery_init_app`` binds a Celery app whose tasks run inside the Flask app context."""
from __future__ import annotations

import ssl
import time

from celery import Celery, Task
from flask import Flask
from kombu import Queue

from tasks.schedule import beat_schedule

# Nothing from ``app`` at module level: ``celery -A tasks`` imports this package before
# tasks/celery.py, which must set PROMETHEUS_MULTIPROC_DIR before prometheus_client is imported.


def celery_init_app(app: Flask) -> Celery:
    """Create the Celery app for ``app`` and store it in ``app.extensions["celery"]``.

    The broker is ``REDIS_URL`` when set, else kombu's SQLAlchemy transport over SQLite
    under ``instance/`` (the embedded default). Reliability settings follow the worker
    rules in DESIGN: late acks, re-queue on a lost worker, prefetch 1, results ignored
    (job state lives in SQL, never in a result backend). Jobs run on the ``jobs`` queue
    with JOB_SOFT_TIME_LIMIT / JOB_TIME_LIMIT, webhook fan-outs and attempts on ``webhooks``;
    a worker started without ``-Q`` consumes every queue. On SIGTERM (with
    ``REMAP_SIGTERM=SIGQUIT``, as the Procfile runs it) running tasks get
    WORKER_SOFT_SHUTDOWN_TIMEOUT seconds (25) to finish; the messages of those still running
    then go back on the queue at once.
    """

    from app import queue
    from app.observability import tasks as observed_tasks
    from app.webhooks.settings import time_limits

    class FlaskTask(Task):
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    config = app.config
    broker_url = config["CELERY_BROKER_URL"]
    time_limit = float(config["JOB_TIME_LIMIT"])
    attempt_soft, attempt_hard = time_limits(config)
    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.conf.update(
        broker_url=broker_url,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=300,
        task_time_limit=330,
        task_queues=(Queue("celery"), Queue("jobs"), Queue("webhooks")),
        # Jobs and webhook sends have queues of their own: a backlog of one never delays the
        # other, and beat's sweeps and dispatches (default queue) wait behind neither.
        task_routes={
            queue.RUN_JOB: {"queue": "jobs"},
            queue.FAN_OUT: {"queue": "webhooks"},
            queue.PUBLISH_JOB_EVENTS: {"queue": "webhooks"},
            queue.DELIVER: {"queue": "webhooks"},
        },
        task_annotations={
            queue.RUN_JOB: {"soft_time_limit": float(config["JOB_SOFT_TIME_LIMIT"]), "time_limit": time_limit},
            # A batch must end before its leases lapse, or the dispatcher would take it over; a
            # fan-out sends the batch it made.
            queue.DELIVER: {"soft_time_limit": attempt_soft, "time_limit": attempt_hard},
            queue.FAN_OUT: {"soft_time_limit": attempt_soft, "time_limit": attempt_hard},
        },
        broker_connection_retry_on_startup=True,
        # A worker whose broker is away keeps trying (after 2, 4, 6 s and so on, up to 30 s
        # apart: kombu's Connection.ensure_connection) rather than exiting after Celery's
        # default 100 tries: it has nothing else to do meanwhile.
        broker_connection_max_retries=None,
        # No remote control (``celery inspect``/``control``; nothing here uses it): its channel
        # on the consumer's connection is what made a worker exit when Redis restarted under
        # load. On a lost connection kombu (5.7.0) closes the connection's channels in turn
        # and stops at the first close that fails; the remote-control channel's close, which
        # deletes its auto-delete queue, fails while Redis is down. The task channel is left
        # open on a transport already detached, and the close Celery makes next restores its
        # unacked messages through it: AttributeError "'NoneType' object has no attribute
        # 'hostname'" in kombu.transport.redis.Channel._connparams, "Unrecoverable error".
        # Gossip and mingle open such channels too; the Procfile's worker runs without them
        # (``--without-gossip --without-mingle``, options with no setting), and without event
        # heartbeats (``--without-heartbeat``), whose publish retries inside the event loop
        # while Redis is down. README, "When
        # Redis restarts"; tests/integration/test_broker_restart.py.
        worker_enable_remote_control=False,
        # Heroku sends SIGTERM to every process of a dyno, SIGKILL 30 s later. With
        # REMAP_SIGTERM=SIGQUIT (the Procfile) the SIGTERM starts this soft shutdown, then a cold
        # one that puts unfinished messages back on the queue at once, not after the Redis
        # visibility timeout; Celery's default warm shutdown would wait without limit while the
        # pool's processes, which get the same SIGTERM, die. Only when tasks are running: an
        # idle worker has nothing to wait for (no ETA tasks here).
        worker_soft_shutdown_timeout=float(config["WORKER_SOFT_SHUTDOWN_TIMEOUT"]),
        worker_enable_soft_shutdown_on_idle=bool(config["WORKER_SOFT_SHUTDOWN_ON_IDLE"]),
        worker_hijack_root_logger=False,
        beat_schedule=beat_schedule(config),
        timezone="UTC",
    )
    if broker_url.startswith(("redis://", "rediss://")):
        # kombu's Redis transport with acknowledgements that cannot stall a worker (tasks/broker.py).
        celery_app.conf.broker_transport = "tasks.broker:Transport"
        celery_app.conf.broker_transport_options = {
            # Longer than the longest task, or Redis hands an unacked task to a second worker.
            # (kombu's SQLAlchemy transport passes these options to create_engine, so only Redis.)
            "visibility_timeout": max(3600, 2 * time_limit),
            # Queues live under the gateway's namespace, like every other key it writes.
            "global_keyprefix": f"{config['KEY_PREFIX']}:celery:",
        }
    if broker_url.startswith("rediss://") and "ssl_cert_reqs" not in broker_url:
        # As for the app's own Redis client (app.extensions.new_redis): Heroku Redis presents a
        # self-signed certificate; a URL with ?ssl_cert_reqs=required verifies it.
        celery_app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_NONE}
    celery_app.conf.update(config.get("CELERY", {}))
    celery_app.set_default()
    observed_tasks.connect(config)
    app.extensions["celery"] = celery_app
    if broker_url.startswith("sqla+"):
        declare_embedded_queues(celery_app)
    # Registers the job and webhook tasks with this app.
    import tasks.jobs
    import tasks.webhooks  # noqa: F401

    return celery_app


def declare_embedded_queues(celery_app: Celery, attempts: int = 5) -> None:
    """Create the embedded broker's tables and queue rows before kombu's own channels need them.

    Web, worker and beat start together on a fresh file, and each channel creates them on
    first use: the processes race, and kombu does not recover a channel that lost (its session
    is left failed, so every later publish or poll on it raises). Declaring here, with a new
    connection per try, means the loser just tries again; once the rows exist, kombu only reads
    them. ``attempts`` tries, 0.1 s apart and growing.
    """
    for attempt in range(1, attempts + 1):
        try:
            with celery_app.connection_for_write() as connection:
                channel = connection.default_channel
                for queue in celery_app.conf.task_queues:
                    queue.bind(channel).declare()
            return
        except Exception:  # a lost race: IntegrityError, "table already exists", "database is locked"
            if attempt == attempts:
                raise
            time.sleep(0.1 * attempt)
