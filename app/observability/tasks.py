"""Celery tasks observed like requests: the request id and the W3C trace context travel in each
task message's headers, every log line of a task carries the id, and each task run writes one
line and is counted.

``before_task_publish`` adds the ``request_id``, ``traceparent`` and ``tracestate`` headers (the
HTTP request's, or the running task's for a task it sends); ``task_prerun`` makes them the
task's (the trace as a hop of its own); ``task_postrun`` logs
``{"msg": "task", "task", "task_id", "outcome", "duration_ms", "request_id"}`` and counts
``frontdoor_celery_tasks_total{task, outcome}``.

A worker's and beat's own lines (Celery's) are JSON on stdout too; Celery's per-task INFO lines
are left out. A worker with ``WORKER_METRICS_PORT`` set serves every one of its processes'
metrics (the pool's children write them to files: tasks/celery.py) on that port, on ``HOST``
(0.0.0.0), from the main process once the pool is up; a child that exits is marked dead for the
live gauges.
"""
from __future__ import annotations

import logging
import os
import time

from celery.signals import (
    before_task_publish,
    setup_logging,
    task_postrun,
    task_prerun,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)
from prometheus_client import multiprocess, start_http_server

from app.observability import metrics, tracing
from app.observability.logging import current_request_id, work_request_id

log = logging.getLogger("frontdoor.tasks")
HEADER = "request_id"
# Celery's final states as words for the log and the metric's label.
OUTCOMES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried", "REJECTED": "rejected", "IGNORED": "ignored"}

_running: dict[str, tuple[float, object, object]] = {}  # task id -> (started, context tokens)


def _publishing(headers: dict | None = None, **_: object) -> None:
    if headers is None:
        return
    request_id = current_request_id()
    if request_id and HEADER not in headers:
        headers[HEADER] = request_id
    trace = tracing.current()
    if trace is not None and tracing.TRACEPARENT not in headers:
        headers.update(trace.fields())


def _header(task, name: str) -> str | None:
    value = getattr(task.request, name, None) if task is not None else None
    return value if isinstance(value, str) else None


def _starting(task_id: str | None = None, task=None, **_: object) -> None:
    trace = tracing.continued(_header(task, tracing.TRACEPARENT), _header(task, tracing.TRACESTATE))
    _running[task_id] = (time.perf_counter(), work_request_id.set(_header(task, HEADER)), tracing.work_trace.set(trace))


def did_nothing(retval: object) -> bool:
    """Whether a task's return value says it found nothing to do: 0, or counts that are all 0
    (``{"due": 0, "woken": 0}``, ``{}``), as the gateway's periodic passes and batches return.
    Its ``task`` line is then a debug line, so that an idle worker is quiet."""
    if isinstance(retval, dict):
        return all(value == 0 for value in retval.values())
    return isinstance(retval, int) and not isinstance(retval, bool) and retval == 0


def _ended(task_id: str | None = None, task=None, state: str | None = None, retval: object = None, **_: object) -> None:
    started, token, trace_token = _running.pop(task_id, (None, None, None))
    outcome = OUTCOMES.get(state or "", (state or "unknown").lower())
    name = getattr(task, "name", "unknown")
    metrics.TASKS.labels(name, outcome).inc()
    fields = {"task": name, "task_id": task_id, "outcome": outcome}
    if started is not None:
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
    log.log(logging.DEBUG if outcome == "succeeded" and did_nothing(retval) else logging.INFO, "task", extra=fields)
    if token is not None:
        work_request_id.reset(token)
        tracing.work_trace.reset(trace_token)


class MetricsPort:
    """The worker's metrics port: Prometheus text on any path of ``host:port``, read from
    ``metrics.registry()`` at each scrape (every process's files in multiprocess mode)."""

    def __init__(self, port: int, host: str) -> None:
        self.port, self.host = port, host
        self.server = None

    def start(self, **_: object) -> None:
        if self.server is not None:
            return
        self.server, _thread = start_http_server(self.port, self.host, registry=metrics.registry())
        log.info("metrics port open", extra={"address": f"{self.host}:{self.server.server_port}"})

    def stop(self, **_: object) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def _child_exit(pid: int | None = None, **_: object) -> None:
    if pid and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


# Celery's own line for every task received and every task that succeeded: the ``task`` line
# says both, so only their warnings and errors (a task that raised, a lost worker) are kept.
_PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


class _QuietSends(logging.Filter):
    """Beat's "Scheduler: Sending due task ..." line (INFO, every WEBHOOK_DISPATCH_INTERVAL):
    kept only when its logger is enabled for DEBUG; the task's own line says what it did."""

    def filter(self, record: logging.LogRecord) -> bool:
        sending = isinstance(record.msg, str) and record.msg.startswith("Scheduler: Sending due task")
        return not sending or logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def _log_as_json(loglevel: int | str | None = None, **_: object) -> bool:
    """Celery's ``setup_logging``: with a receiver connected Celery configures no logging of its
    own, so its lines reach the root logger, which writes JSON on stdout
    (``app.observability.logging``) at the worker's or beat's ``--loglevel``. Beat's line for
    each periodic task it sends is left out below DEBUG (``_QuietSends``)."""
    logging.getLogger().setLevel(loglevel or logging.WARNING)
    for name in _PER_TASK_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    beat = logging.getLogger("celery.beat")
    if not any(isinstance(each, _QuietSends) for each in beat.filters):
        beat.addFilter(_QuietSends())
    return True


def connect(config: dict) -> None:
    """Observe the tasks of every Celery app in this process (the signals are global; once);
    in a worker, serve its metrics on ``config["WORKER_METRICS_PORT"]`` when that is set."""
    before_task_publish.connect(_publishing, dispatch_uid="frontdoor-request-id", weak=False)
    task_prerun.connect(_starting, dispatch_uid="frontdoor-task-start", weak=False)
    task_postrun.connect(_ended, dispatch_uid="frontdoor-task-end", weak=False)
    worker_process_shutdown.connect(_child_exit, dispatch_uid="frontdoor-child-exit", weak=False)
    setup_logging.connect(_log_as_json, dispatch_uid="frontdoor-json-logs", weak=False)
    port = config.get("WORKER_METRICS_PORT")
    if port is not None:
        # The first app created in the process decides (a worker creates one: tasks/celery.py).
        served = MetricsPort(int(port), os.environ.get("HOST", "0.0.0.0"))
        worker_ready.connect(served.start, dispatch_uid="frontdoor-metrics-port", weak=False)
        worker_shutdown.connect(served.stop, dispatch_uid="frontdoor-metrics-port-stop", weak=False)
