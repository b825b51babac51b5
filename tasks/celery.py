"""Entry point for ``celery -A tasks``: the Celery app of a freshly created gateway app.

A worker's tasks run in the prefork pool's child processes, so its metrics use
prometheus-client's multiprocess mode: every process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR``, and the worker's metrics port (``GATEWAY_WORKER_METRICS_PORT``)
or a web server given the same directory adds them up. prometheus-client chooses file-backed
values when it is imported, so the directory is set here, before ``app`` is imported. A
directory given in the environment is used as it is; else a fresh one is made and removed
when the process exits.
"""
import atexit
import logging
import os
import shutil
import tempfile

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
else:
    _own_metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="frontdoor-metrics-celery-")
    _maker = os.getpid()
    # Only the process that made it: the pool's children inherit this hook and leave first.
    atexit.register(lambda: os.getpid() == _maker and shutil.rmtree(_own_metrics_dir, ignore_errors=True))

import sys

import billiard.pool

# A pool process that is stopping waits, before it exits, until the main process has counted
# every result it sent: up to 300 x 0.1 s in billiard 4.3. In a cold shutdown the main process
# joins the pool from its signal handler, and a result it never counts (a task cancelled by the
# shutdown) kept that join waiting 30 s, past Heroku's SIGKILL, so the unfinished messages were
# never handed back (tests/integration/test_deploy.py). 3 s is ample for a result on its way.
billiard.pool.GUARANTEE_MESSAGE_CONSUMPTION_RETRY_LIMIT = 30

from app import create_app  # after the directory is set
from app.config import SettingsError

try:
    app = create_app().extensions["celery"]
except SettingsError as exc:  # a worker or beat with a bad environment stops with its lines
    sys.exit(f"error: {exc}")
# Python warnings a worker or beat meets from here on (Celery's own at start) are log lines too:
# JSON on stdout, like every other (app.observability.logging).
logging.captureWarnings(True)
