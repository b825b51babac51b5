"""Celery tasks observed like requests: the request id and the W3C trace context travel in each
task message's headers, every log line of a task carries the id, and each task run writes one
line and is counted.

``before_task_publish`` adds the ``request_id``, ``traceparent`` and ``tracestate`` headers (the
HTTP request's, or the running task's for a task it sends); ``task_prerun`` makes them the
task's (the trace as a hop of its own); ``task_postrun`` logs
``{"msg": "task", "task", "task_id", "outcome", "duration_ms", "request_id"}`` and counts
``frontdoor_celery_tasks_total{task, outcome}``.
"""
from __future__ import annotations

import logging
import time

from celery.signals import before_task_publish, task_postrun, task_prerun

from app.observability import metrics, tracing
from app.observability.logging import current_request_id, task_request_id

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
    _running[task_id] = (time.perf_counter(), task_request_id.set(_header(task, HEADER)), tracing.task_trace.set(trace))


def _ended(task_id: str | None = None, task=None, state: str | None = None, **_: object) -> None:
    started, token, trace_token = _running.pop(task_id, (None, None, None))
    outcome = OUTCOMES.get(state or "", (state or "unknown").lower())
    name = getattr(task, "name", "unknown")
    metrics.TASKS.labels(name, outcome).inc()
    fields = {"task": name, "task_id": task_id, "outcome": outcome}
    if started is not None:
        fields["duration_ms"] = round((time.perf_counter() - started) * 1000, 3)
    log.info("task", extra=fields)
    if token is not None:
        task_request_id.reset(token)
        tracing.task_trace.reset(trace_token)


def connect() -> None:
    """Observe the tasks of every Celery app in this process (the signals are global; once)."""
    before_task_publish.connect(_publishing, dispatch_uid="frontdoor-request-id", weak=False)
    task_prerun.connect(_starting, dispatch_uid="frontdoor-task-start", weak=False)
    task_postrun.connect(_ended, dispatch_uid="frontdoor-task-end", weak=False)
