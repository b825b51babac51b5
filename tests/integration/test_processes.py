"""Process-level behaviour: start-up refusal on a bad route file, Celery worker and beat."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import services

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _serve(tmp_path: Path, routes: str) -> subprocess.CompletedProcess:
    """Run the Procfile's web command on ``routes``; it is expected to exit, not to serve."""
    route_file = tmp_path / "gateway.yaml"
    route_file.write_text(routes)
    return subprocess.run(
        [str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "app:create_app()"],
        check=False,
        cwd=services.ROOT,
        env={"PATH": str(BIN), "PORT": str(services.free_port()), "GATEWAY_CONFIG": str(route_file)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_gunicorn_refuses_to_start_on_a_bad_route_file_and_names_the_key(tmp_path):
    result = _serve(tmp_path, "upstreams:\n  u:\n    targets: [http://127.0.0.1:1]\nroutes:\n  - path: /healthz\n    upstream: u\n")
    assert result.returncode != 0
    assert "routes[0].path: '/healthz' overlaps the reserved path '/healthz'" in result.stderr


def test_gunicorn_refuses_to_start_when_a_variable_is_unset(tmp_path):
    result = _serve(tmp_path, 'upstreams:\n  u:\n    targets: ["${NOT_SET_ANYWHERE}"]\nroutes: []\n')
    assert result.returncode != 0
    assert "upstreams.u.targets[0]: environment variable NOT_SET_ANYWHERE is not set" in result.stderr


def _celery_env(tmp_path: Path, broker_env: dict[str, str]) -> dict[str, str]:
    return {
        "GATEWAY_CONFIG": str(services.ROOT / "gateway.yaml"),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'celery.sqlite'}",
        **broker_env,
    }


def _send_task(env: dict[str, str]) -> None:
    """Publish Celery's built-in ``celery.backend_cleanup`` through the broker ``env`` names."""
    code = "from tasks.celery import app; app.send_task('celery.backend_cleanup')"
    subprocess.run([sys.executable, "-c", code], cwd=services.ROOT, env={**os.environ, **env}, check=True, timeout=60)


def _run_worker_and_beat(tmp_path: Path, env: dict[str, str]) -> None:
    """Start the Procfile's worker and beat commands: the worker runs a task sent through the broker."""
    worker_log, beat_log = tmp_path / "worker.log", tmp_path / "beat.log"
    worker = services.start(
        [str(BIN / "celery"), "-A", "tasks", "worker", "--loglevel", "INFO", "--concurrency", "1", "--hostname", f"{services.unique('w')}@%h"],
        env=env,
        log=worker_log,
    )
    beat = services.start(
        [str(BIN / "celery"), "-A", "tasks", "beat", "--loglevel", "INFO", "--schedule", str(tmp_path / "beat-schedule")],
        env=env,
        log=beat_log,
    )
    try:
        _send_task(env)
        deadline = time.monotonic() + 30
        def ran() -> bool:  # the worker's one JSON line for the task
            lines = services.json_lines(worker_log.read_text())
            return any(line.get("msg") == "task" and line.get("task") == "celery.backend_cleanup" and line.get("outcome") == "succeeded" for line in lines)

        while not ran():
            assert time.monotonic() < deadline, worker_log.read_text()
            assert worker.poll() is None, worker_log.read_text()
            time.sleep(0.2)
        assert beat.poll() is None, beat_log.read_text()
        assert "beat: Starting..." in beat_log.read_text()
    finally:
        services.stop(worker)
        services.stop(beat)


@pytest.mark.redis
def test_worker_and_beat_run_on_redis(tmp_path, redis_url, key_prefix):
    _run_worker_and_beat(tmp_path, _celery_env(tmp_path, {"REDIS_URL": redis_url, "GATEWAY_KEY_PREFIX": key_prefix}))


def test_worker_and_beat_run_on_the_embedded_sqlite_broker(tmp_path):
    env = _celery_env(tmp_path, {"GATEWAY_CELERY_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"})
    env["REDIS_URL"] = ""
    _run_worker_and_beat(tmp_path, env)
