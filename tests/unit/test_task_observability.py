"""A Celery task carries the request id of the request that sent it: in its message headers, on
every line it logs, on its own task line; and each run is counted by task and outcome. A worker
counts in multiprocess mode and can serve its metrics on a port."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile

import pytest
import requests
from celery.contrib.testing.worker import start_worker
from flask import g
from prometheus_client import REGISTRY

from app.observability import metrics, tracing
from app.observability.logging import current_request_id
from app.observability.tasks import MetricsPort
from tests import services
from tests.services import logged

inside = logging.getLogger("frontdoor.test.inside")
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def worked(app):
    """``(celery_app, run)``: run(sender) sends the test tasks from ``sender`` and serves them
    with an in-process worker until both have ended; the task lines and the lines logged inside."""
    celery_app = app.extensions["celery"]
    name = services.unique("test.task")

    @celery_app.task(name=f"{name}.echo")
    def echo(n: int) -> int:
        trace = tracing.current()
        inside.info("inside the task", extra={"n": n, "trace": None if trace is None else (trace.trace_id, trace.span_id)})
        if n == 2:
            raise ValueError("a failing task")
        return n

    def run(sender) -> tuple[list[logging.LogRecord], list[logging.LogRecord]]:
        with logged("frontdoor.tasks") as task_lines, logged("frontdoor.test.inside") as inner:
            sender(echo)
            with start_worker(celery_app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
                services.wait_until(lambda: len([r for r in task_lines.records if r.task.startswith(name)]) >= 2, 10, "two task lines")
        return [r for r in task_lines.records if r.task.startswith(name)], list(inner.records)

    return name, run


def test_a_task_sent_during_a_request_logs_that_requests_id_on_every_line(app, worked):
    name, run = worked
    succeeded = REGISTRY.get_sample_value("frontdoor_celery_tasks_total", {"task": f"{name}.echo", "outcome": "succeeded"}) or 0.0

    def send(echo) -> None:
        with app.test_request_context("/anything"):
            g.request_id = "req-from-the-client"
            g.trace = tracing.accept_or_start(f"00-{TRACE_ID}-00f067aa0ba902b7-01", None)
            echo.delay(1)
            echo.delay(2)

    task_lines, inner = run(send)

    assert {r.request_id for r in task_lines} == {"req-from-the-client"}
    assert {r.request_id for r in inner} == {"req-from-the-client"}
    # Each task is a hop of the request's trace: the trace id goes on, each with a span id of its own.
    assert {r.trace[0] for r in inner} == {TRACE_ID} and len({r.trace[1] for r in inner}) == 2
    assert sorted(r.outcome for r in task_lines) == ["failed", "succeeded"]
    assert all(r.duration_ms >= 0 for r in task_lines)
    assert REGISTRY.get_sample_value("frontdoor_celery_tasks_total", {"task": f"{name}.echo", "outcome": "succeeded"}) == succeeded + 1
    assert REGISTRY.get_sample_value("frontdoor_celery_tasks_total", {"task": f"{name}.echo", "outcome": "failed"}) >= 1


def test_a_task_sent_outside_a_request_has_no_request_id_and_leaves_none_behind(app, worked):
    _, run = worked

    task_lines, inner = run(lambda echo: (echo.delay(1), echo.delay(3)))

    assert [r.request_id for r in task_lines] == [None, None]
    assert [r.request_id for r in inner] == [None, None]
    assert [r.trace for r in inner] == [None, None]
    assert current_request_id() is None  # nothing of a task's context is left behind


# A worker's metrics: multiprocess mode from the entry module on, and a port of its own.


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return subprocess.run([sys.executable, "-c", code], cwd=services.ROOT, env={**environ, **env}, capture_output=True, text=True, timeout=60, check=False)


def test_the_tasks_package_imports_no_metrics_before_its_entry_module_sets_their_directory():
    # celery -A tasks imports the package first: were prometheus_client imported by then, the
    # pool's processes would keep their counts to themselves.
    result = run_python("import sys, tasks; print(sorted(m for m in ('app', 'prometheus_client') if m in sys.modules))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_worker_entry_module_counts_into_a_directory_of_its_own_and_removes_it_on_exit(tmp_path):
    code = (
        "import os, tasks.celery, prometheus_client.values as v; "
        "from app.observability import metrics; metrics.TASKS.labels('t', 'succeeded').inc(); "
        "print(os.environ['PROMETHEUS_MULTIPROC_DIR']); print(v.ValueClass.__name__)"
    )
    result = run_python(code, DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}", REDIS_URL="",
                        GATEWAY_CELERY_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    assert result.returncode == 0, result.stderr
    made, value_class = result.stdout.split()
    assert value_class == "MmapedValue"  # prometheus-client's file-backed values
    assert made.startswith(tempfile.gettempdir())
    assert not os.path.exists(made)

    given = tmp_path / "given"
    result = run_python(code, PROMETHEUS_MULTIPROC_DIR=str(given), DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        REDIS_URL="", GATEWAY_CELERY_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(given), "MmapedValue"]
    # A directory given is left to whoever gave it, with the counts in it.
    assert [name for name in os.listdir(given) if name.startswith("counter_")]


def test_the_metrics_port_serves_the_counts_until_it_is_stopped(app):
    port = MetricsPort(0, "127.0.0.1")
    port.start()
    try:
        url = f"http://127.0.0.1:{port.server.server_port}/metrics"
        name = services.unique("test.port")
        metrics.TASKS.labels(name, "succeeded").inc(3)
        text = requests.get(url, timeout=5).text
        assert f'frontdoor_celery_tasks_total{{outcome="succeeded",task="{name}"}} 3.0' in text
    finally:
        port.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)


@pytest.mark.parametrize(
    ("state", "retval", "written"),
    [
        ("SUCCESS", {"due": 0, "woken": 0}, False),  # beat's dispatch on an idle gateway
        ("SUCCESS", {}, False),
        ("SUCCESS", 0, False),
        ("SUCCESS", None, True),  # says nothing either way
        ("SUCCESS", {"due": 2, "woken": 1}, True),
        ("SUCCESS", 3, True),
        ("SUCCESS", "succeeded", True),
        ("FAILURE", None, True),
    ],
)
def test_a_task_that_found_nothing_to_do_writes_its_task_line_only_at_debug(app, state, retval, written):
    from celery.signals import task_postrun, task_prerun

    from app import queue

    task = app.extensions["celery"].tasks[queue.DISPATCH]
    with logged("frontdoor.tasks") as lines:
        task_prerun.send(sender=task, task_id="task-1", task=task)
        task_postrun.send(sender=task, task_id="task-1", task=task, state=state, retval=retval)
    assert [record.msg for record in lines.records] == (["task"] if written else [])


def test_beat_writes_its_line_for_each_periodic_send_only_at_debug(app):
    from app.observability.tasks import _log_as_json

    beat, root = logging.getLogger("celery.beat"), logging.getLogger()
    level, filters = root.level, list(beat.filters)
    try:
        with logged("celery.beat") as lines:
            _log_as_json(loglevel="INFO")  # as the Procfile's beat runs
            beat.info("Scheduler: Sending due task %s (%s)", "webhooks-dispatch", "frontdoor.webhooks.dispatch")
            beat.info("beat: Starting...")
            _log_as_json(loglevel="DEBUG")
            beat.info("Scheduler: Sending due task %s (%s)", "jobs-sweep", "frontdoor.jobs.sweep")
    finally:
        root.setLevel(level)
        beat.filters[:] = filters
    assert [record.getMessage() for record in lines.records] == ["beat: Starting...", "Scheduler: Sending due task jobs-sweep (frontdoor.jobs.sweep)"]
