"""Redis restarts under load: the worker, run as the Procfile runs it, stays up and nothing the
gateway accepted is lost; a worker that dies all the same is started again by its supervisor.

The stack is test_webhooks.py's (the gateway under gunicorn, beat, a receiver that verifies
every delivery) on a redis-server of the test's own, with an append-only file as Heroku Redis
keeps one, so that the test can stop and start it. The worker is the Procfile's ``worker`` line
run by a shell, supervisor and all. Leases, sweeps and retries are test_webhooks.WEBHOOK_ENV's:
a message Redis lost is sent again within seconds.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest
import redis
import requests

from tests import services
from tests.integration import test_webhooks
from tests.integration.test_jobs import FINAL, Started
from tests.integration.test_webhooks import Api

# test_webhooks.py's fixtures: its stack (on this module's redis_url), and its receiver.
stack, make_receiver, receiver = test_webhooks.stack, test_webhooks.make_receiver, test_webhooks.receiver

pytestmark = [pytest.mark.slow, pytest.mark.redis]

BIN = services.BIN


@pytest.fixture
def broker(tmp_path):
    """A redis-server of this test's own, persisting to an append-only file under tmp_path."""
    server = services.RedisServer()
    data = tmp_path / "redis"
    data.mkdir()
    server.command = [*server.command[: server.command.index("--appendonly")], "--appendonly", "yes", "--dir", str(data)]
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(broker):
    """The stack's Redis (REDIS_URL, key_prefix) is the test's own server."""
    return broker.url


def restart(broker: services.RedisServer, how: int, down: float = 1.0) -> None:
    """Stop ``broker`` with signal ``how`` (SIGTERM: a shutdown that writes the append-only file;
    SIGKILL: a crash, which may lose its last second of writes), and start it ``down`` s later."""
    services.stop(broker.process, how)
    broker.process = None
    time.sleep(down)
    broker.start()


def procfile_worker(stack, name: str = "worker", concurrency: int = 4) -> Started:
    """The Procfile's worker line through a shell, as Heroku and honcho run it, in a session of its own."""
    line = dict(raw.split(": ", 1) for raw in (services.ROOT / "Procfile").read_text().splitlines() if ": " in raw)["worker"]
    log = stack.root / f"{name}.log"
    env = {**stack.env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "WORKER_CONCURRENCY": str(concurrency)}
    started = Started(services.start(["/bin/sh", "-c", line], env=env, log=log), log)
    stack.started.append(started)
    return started


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def celery_main(worker: Started) -> int | None:
    """The pid of the Celery worker's main process: the child of the supervisor."""
    group = [(pid, parent) for pid, state, parent, pgid in services.processes() if pgid == worker.process.pid and state != "Z"]
    supervisors = {pid for pid, _ in group if "tasks.supervise" in cmdline(pid)}
    found = [pid for pid, parent in group if parent in supervisors and "celery" in " ".join(cmdline(pid))]
    return found[0] if found else None


@dataclass
class Load:
    """Jobs (``/async/delay/..``) and events sent to the gateway from a thread until stopped:
    each accepted job's URL, each accepted event's message id, and any request not accepted."""

    base: str
    api: Api
    jobs: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            # Some jobs run across a restart; on average fewer than the worker's 4 processes are
            # busy, so that it also waits for more (a BRPOP outstanding) when Redis goes.
            delay = (0.2, 0.5, 2)[n % 3]
            try:
                job = requests.get(f"{self.base}/async/delay/{delay}", headers={"X-API-Key": self.api.key}, timeout=10)
                if job.status_code == 202:
                    self.jobs.append(job.headers["Location"])
                else:
                    self.refused.append(f"job {job.status_code} {job.text[:200]}")
                event = self.api.call("POST", "/_gateway/events", expect=None, json={"type": "load.item", "data": {"n": n}})
                if event.status_code == 202:
                    self.messages.append(event.json()["id"])
                else:
                    self.refused.append(f"event {event.status_code} {event.text[:200]}")
            except requests.RequestException as exc:
                self.refused.append(repr(exc))
            time.sleep(0.25)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def statuses(self) -> dict[str, str]:
        return {location: requests.get(location, headers={"X-API-Key": self.api.key}, timeout=10).json()["status"] for location in list(self.jobs)}


@pytest.mark.timeout(120)
def test_redis_restarted_twice_under_job_and_webhook_load_loses_nothing_and_the_worker_stays_up(stack, receiver, broker):
    stack.beat()
    worker = procfile_worker(stack)
    api = stack.api()
    endpoint = api.create_endpoint(receiver.url("/load"), event_types=["load.*"])
    receiver.secrets["/load"] = [endpoint["secret"]]
    stack.until(lambda: " ready." in worker.text(), 30, "the worker ready")
    main = celery_main(worker)
    assert main is not None, worker.text()[-3000:]

    began = time.monotonic()
    with Load(stack.gateway.url, api) as load:
        try:
            for how in (signal.SIGKILL, signal.SIGTERM):
                # Work in flight: deliveries arriving since the last restart (the worker is
                # consuming again), a job running (a task delivered and unacknowledged).
                delivered = len(receiver.on("/load"))
                stack.until(
                    lambda: len(receiver.on("/load")) > delivered and "running" in load.statuses().values(),  # noqa: B023
                    20, "deliveries arriving and a job running",
                )
                if how == signal.SIGKILL:
                    # A crash whose pub/sub connections go first: the order in which a worker
                    # with remote control or gossip channels used to exit
                    # (AttributeError 'NoneType' object has no attribute 'hostname').
                    redis.Redis.from_url(broker.url).client_kill_filter(_type="pubsub")
                    time.sleep(0.02)
                restart(broker, how)
            time.sleep(2)  # load goes on while the worker connects again
        finally:
            if broker.process is None:
                broker.start()
    loaded = time.monotonic() - began

    # 0 lost, as a user sees it: every accepted job ends, every accepted event arrives.
    assert load.refused == [], load.refused
    assert len(load.jobs) >= 10 and len(load.messages) >= 10, (len(load.jobs), len(load.messages))
    statuses = stack.until(lambda: (found := load.statuses()) and set(found.values()) <= FINAL and found, 40, "every job ended", interval=0.5)
    assert set(statuses.values()) == {"succeeded"}, statuses
    stack.until(lambda: {seen.webhook_id for seen in receiver.on("/load")} >= set(load.messages), 30, "every message delivered", interval=0.5)
    seen = receiver.on("/load")
    assert {s.webhook_id for s in seen} == set(load.messages)  # each accepted event, nothing else
    assert all(s.verified for s in seen)

    # The worker lived through both restarts: the same main process, never started again.
    text = worker.text()
    assert worker.process.poll() is None and celery_main(worker) == main, text[-3000:]
    assert "Unrecoverable error" not in text and "worker exited; starting it again" not in text, text[-3000:]
    print(f"\n{len(load.jobs)} jobs and {len(load.messages)} events over {loaded:.1f} s and two Redis restarts; the worker "
          f"lost its connection {text.count('Connection to broker lost')} times; {len(seen) - len(load.messages)} repeated deliveries")


@pytest.mark.timeout(90)
def test_a_worker_whose_every_task_ended_while_redis_was_down_consumes_again(stack, broker):
    # One process, so one prefetched task fills the worker's window, and no BRPOP is outstanding
    # while it runs. The job ends while Redis is down, so its acknowledgement fails; with kombu's
    # own Redis transport the window stayed full, the worker never asked Redis for more, never
    # saw the connection was gone, and took no further task until restarted (tasks/broker.py).
    worker = procfile_worker(stack, concurrency=1)
    api = stack.api()
    stack.until(lambda: " ready." in worker.text(), 30, "the worker ready")

    def submit(delay: float) -> str:
        submitted = requests.get(f"{stack.gateway.url}/async/delay/{delay}", headers={"X-API-Key": api.key}, timeout=10)
        assert submitted.status_code == 202, submitted.text
        return submitted.headers["Location"]

    def status(location: str) -> dict:
        return requests.get(location, headers={"X-API-Key": api.key}, timeout=10).json()

    first = submit(2)
    stack.until(lambda: status(first)["status"] == "running", 15, "the first job running")
    services.stop(broker.process, signal.SIGTERM)
    broker.process = None
    try:
        stack.until(lambda: "Couldn't ack" in worker.text(), 15, "the first job ended, its acknowledgement refused")
    finally:
        broker.start()
    assert status(first)["status"] == "succeeded"

    second = submit(0.1)
    job = stack.until(lambda: (found := status(second))["status"] in FINAL and found, 30, "the second job ended")
    assert job["status"] == "succeeded", job
    text = worker.text()
    assert "Connection to broker lost" in text and celery_main(worker) is not None, text[-3000:]
    assert "worker exited; starting it again" not in text, text[-3000:]


@pytest.mark.timeout(90)
def test_a_worker_killed_outright_is_started_again_by_its_supervisor_and_its_job_finishes(stack, broker):
    stack.beat()
    worker = procfile_worker(stack)
    api = stack.api()
    stack.until(lambda: " ready." in worker.text(), 30, "the worker ready")
    first = celery_main(worker)
    submitted = requests.get(f"{stack.gateway.url}/async/delay/2", headers={"X-API-Key": api.key}, timeout=10)
    assert submitted.status_code == 202, submitted.text
    location = submitted.headers["Location"]
    stack.until(lambda: '"job started"' in worker.text(), 15, "the job started")

    # What no setting prevents: the kernel's OOM killer, say. SIGKILL to the main process alone.
    os.kill(first, signal.SIGKILL)
    restarted = stack.until(lambda: (pid := celery_main(worker)) not in (None, first) and pid, 15, "the worker started again")
    exited = [line for line in services.json_lines(worker.text()) if line.get("msg") == "worker exited; starting it again"]
    assert [(line["exit_status"], line["restart_in_s"]) for line in exited] == [(128 + signal.SIGKILL, 1.0)]

    job = stack.until(lambda: (found := requests.get(location, headers={"X-API-Key": api.key}, timeout=10).json())["status"] in FINAL and found, 30, "the job ended")
    assert job["status"] == "succeeded", job
    assert worker.process.poll() is None and celery_main(worker) == restarted
