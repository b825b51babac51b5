"""Async jobs end to end: the gateway under gunicorn (2 workers), a real Celery worker and beat,
httpbin as the upstream, on Redis, on the embedded default (SQLite database, kombu's SQLAlchemy
broker) and on PostgreSQL.

Each test has a stack of its own: its own database (a SQLite file, or a PostgreSQL database
created for it), its own Redis key prefix (Celery's queues live under it too) and its own
processes, all stopped when the test ends, failed or not. Leases and sweep intervals are
short (``JOB_ENV``) so that a lost worker is noticed within seconds.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import requests

from tests import services

BIN = Path(sys.executable).parent
CELERY = str(BIN / "celery")
FLASK = str(BIN / "flask")

pytestmark = pytest.mark.slow

FINAL = frozenset({"succeeded", "failed", "canceled"})
ORDER = ("notStarted", "running", "succeeded")

# A worker renews its claim every LEASE / 3 s; beat sweeps every second; a job left notStarted
# is sent again after REQUEUE_AFTER s (doubled per message).
LEASE = 3
JOB_ENV = {
    "GATEWAY_JOB_LEASE": str(LEASE),
    "GATEWAY_JOB_SWEEP_INTERVAL": "1",
    "GATEWAY_JOB_REQUEUE_AFTER": "2",
    "GATEWAY_JOB_RETRY_AFTER": "1",
}

ROUTES = """\
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 10.0}}
    job_timeout: {{connect: 1.0, read: 30.0}}
  counter:
    targets: ["{counter}"]
routes:
  - path: /httpbin
    upstream: httpbin
    strip_prefix: true
  - path: /async
    name: async
    upstream: httpbin
    strip_prefix: true
    mode: async
  - path: /counted
    name: counted
    upstream: counter
    strip_prefix: true
    mode: async
"""

# The request fields the gateway adds or rewrites on the way upstream (README, "What the proxy
# does"), and the hop-by-hop Connection it drops.
GATEWAY_FIELDS = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "x-request-id", "connection", "traceparent", "tracestate"})


@dataclass
class Started:
    """A process started for the stack, and its log."""

    process: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Stack:
    """A gateway with its database and broker; workers and beat are started by the test."""

    backend: str
    env: dict[str, str]
    root: Path
    routes: str
    launch: object  # conftest's start_gateway
    started: list[Started] = field(default_factory=list)
    _gateway: object = None  # conftest.Gateway
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def gateway(self):
        """The gateway under gunicorn (2 workers), started on first use: a test that starts its
        worker first has it boot while gunicorn does."""
        with self._lock:
            if self._gateway is None:
                self._gateway = self.launch(self.routes, workers=2, **self.env)
        return self._gateway

    # processes

    def worker(self, name: str = "worker", concurrency: int = 2) -> Started:
        """``celery -A tasks worker`` as the Procfile runs it (not waiting for it to be ready:
        what it should do waits in the queue meanwhile)."""
        log = self.root / f"{name}.log"
        process = services.start(
            [CELERY, "-A", "tasks", "worker", "--loglevel", "INFO", "--concurrency", str(concurrency),
             "--hostname", f"{services.unique(name)}@%h"],
            env=self.env,
            log=log,
        )
        worker = Started(process, log)
        self.started.append(worker)
        return worker

    def beat(self) -> Started:
        log = self.root / "beat.log"
        process = services.start(
            [CELERY, "-A", "tasks", "beat", "--loglevel", "INFO", "--schedule", str(self.root / "beat-schedule")],
            env=self.env,
            log=log,
        )
        beat = Started(process, log)
        self.started.append(beat)
        return beat

    def stop(self) -> None:
        """Kill everything the stack started, beat first (no new messages), the gateway last.
        Nothing of a test's broker or database outlives it, so nothing needs a graceful stop,
        which takes seconds (a Celery worker's on the SQLAlchemy broker, gunicorn's)."""
        processes = [s.process for s in sorted(self.started, key=lambda s: s.log.name != "beat.log")]
        if self._gateway is not None:
            processes.append(self._gateway.process)
        failures = []
        for process in processes:
            try:
                services.kill_group(process)
            except Exception as exc:  # noqa: BLE001 - kill the others anyway, then report
                failures.append(exc)
        if failures:
            raise failures[0]

    # HTTP

    def url(self, path: str) -> str:
        return f"{self.gateway.url}{path}"

    def submit(self, path: str, method: str = "GET", **kwargs) -> requests.Response:
        """Send a request to an async route (or POST /_gateway/jobs) and check the 202."""
        response = requests.request(method, self.url(path), timeout=10, **kwargs)
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
        assert response.headers["Operation-Location"] == location
        assert location == f"{self.gateway.url}/_gateway/jobs/{response.json()['id']}"
        # The 202 shows the job as it is by then: a fast worker may have taken it, even ended it.
        if response.json()["status"] in FINAL:
            assert "Retry-After" not in response.headers
        else:
            assert int(response.headers["Retry-After"]) >= 1
        return response

    def job(self, location: str) -> dict:
        response = requests.get(location, timeout=10)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in FINAL:
            assert "Retry-After" not in response.headers
        else:
            assert int(response.headers["Retry-After"]) >= 1
        return job

    def follow(self, location: str, timeout: float, until=FINAL, seen: list[str] | None = None) -> tuple[dict, list[str]]:
        """Poll ``location`` every 0.1 s until the job's status is in ``until``; return the job
        and the statuses seen, in order, each once (appended to ``seen`` when given)."""
        seen = [] if seen is None else seen
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(location)
            if not seen or seen[-1] != job["status"]:
                seen.append(job["status"])
            if job["status"] in until:
                return job, seen
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {location} still {job['status']} after {timeout} s (seen {seen}): {job}\n{self.logs()}")
            time.sleep(0.1)

    def logs(self, size: int = 3000) -> str:
        return "\n".join(f"--- {s.log.name} ---\n{s.text()[-size:]}" for s in self.started)


def migrate(env: dict[str, str]) -> None:
    """The schema of ``env["DATABASE_URL"]`` as the release phase (``flask db upgrade``) makes
    it: a copy of a database the release phase made once this session (``services.migrate``)."""
    services.migrate(env)


BACKENDS = {
    "redis": pytest.param("redis", marks=pytest.mark.redis, id="redis"),
    "sqlite": pytest.param("sqlite", id="embedded-sqlite"),
    "postgres": pytest.param("postgres", marks=[pytest.mark.redis, pytest.mark.postgres], id="postgres-redis"),
}


@pytest.fixture
def stack(request, tmp_path, start_gateway, httpbin_url, counting_upstream):
    """The gateway on the backend the test is parametrized with (indirect): ``redis`` (SQLite
    database, Redis broker), ``sqlite`` (the embedded default: SQLite database and broker, no
    Redis at all) or ``postgres`` (PostgreSQL database, Redis broker); or ``(backend, env)``
    with settings of the test's own. Schema by migration, as the release phase does it."""
    backend, extra = request.param if isinstance(request.param, tuple) else (request.param, {})
    route_file = tmp_path / "gateway.yaml"
    routes = ROUTES.format(httpbin=httpbin_url, counter=counting_upstream.url)
    route_file.write_text(routes)
    env = {**JOB_ENV, "GATEWAY_CONFIG": str(route_file)}
    if backend == "sqlite":
        # REDIS_URL is set in CI for other tests: the embedded default must not see it.
        env.update(REDIS_URL="", GATEWAY_CELERY_BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}")
    else:
        env.update(REDIS_URL=request.getfixturevalue("redis_url"), GATEWAY_KEY_PREFIX=request.getfixturevalue("key_prefix"))
    if backend == "postgres":
        env["DATABASE_URL"] = request.getfixturevalue("postgres_database")
    else:
        env["DATABASE_URL"] = f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    env.update(extra)
    migrate(env)
    built = Stack(backend, env, tmp_path, routes, start_gateway)
    try:
        yield built
    finally:
        built.stop()


def direct(httpbin_url: str, path: str) -> requests.Response:
    return requests.get(f"{httpbin_url}{path}", timeout=30)


def echoed(body: dict) -> dict:
    """httpbin's echo of a request without the fields the gateway sets or drops."""
    headers = {k: v for k, v in body["headers"].items() if k.lower() not in GATEWAY_FIELDS}
    return {**body, "headers": headers}


def assert_statuses_in_order(seen: list[str]) -> None:
    assert seen[-1] == "succeeded", seen
    assert "running" in seen, f"running was never observed: {seen}"
    assert [ORDER.index(s) for s in seen] == sorted(ORDER.index(s) for s in seen), seen


# 1. The full cycle ---------------------------------------------------------------------------


@pytest.mark.parametrize("stack", list(BACKENDS.values()), indirect=True)
def test_a_job_goes_from_202_through_running_to_its_result_byte_for_byte(stack, httpbin_url):
    stack.beat()  # sweeping every second: a job longer than its lease must keep its one claim
    stack.worker()
    services.wait_until(lambda: len(stack.gateway.worker_pids()) == 2, 10, "two gunicorn workers")

    with ThreadPoolExecutor(1) as pool:
        expected_slow = pool.submit(direct, httpbin_url, "/delay/4?show_env=1")
        slow = stack.submit("/async/delay/4?show_env=1")
        accepted = slow.json()
        assert accepted["status"] in ("notStarted", "running"), accepted
        assert accepted["request"] == {"method": "GET", "path": "/async/delay/4", "query": "show_env=1"}
        location = slow.headers["Location"]

        seen: list[str] = []
        running, _ = stack.follow(location, timeout=20, until={"running", *FINAL}, seen=seen)
        assert running["status"] == "running", (seen, running)
        early = requests.get(f"{location}/result", timeout=10)
        assert early.status_code == 409
        assert early.headers["Content-Type"] == "application/problem+json"
        assert early.json()["type"].endswith("/job-not-succeeded")

        job, _ = stack.follow(location, timeout=30, seen=seen)
        assert_statuses_in_order(seen)
        assert job["progress"]["percent"] == 100
        assert job["attempts"] == 1, job  # the heartbeat kept the claim past LEASE seconds
        assert job["error"] is None
        assert job["resourceLocation"] == f"{location}/result"
        result = requests.get(job["resourceLocation"], timeout=10)
        expected = expected_slow.result()
    assert result.status_code == expected.status_code == 200
    assert result.headers["Content-Type"] == expected.headers["Content-Type"]
    assert int(result.headers["Content-Length"]) == len(result.content) == job["result"]["size"]
    assert echoed(result.json()) == echoed(expected.json())
    assert "frontdoor" in result.json()["headers"]["Via"]
    assert result.json()["headers"]["X-Request-Id"] == accepted["request_id"]

    # Byte for byte: a binary body (not UTF-8), compared with httpbin's own answer.
    exact = stack.submit("/async/bytes/4096?seed=7")
    job, _ = stack.follow(exact.headers["Location"], timeout=20)
    assert job["status"] == "succeeded", job
    result = requests.get(job["resourceLocation"], timeout=10)
    expected = direct(httpbin_url, "/bytes/4096?seed=7")
    assert result.status_code == expected.status_code == 200
    assert result.headers["Content-Type"] == expected.headers["Content-Type"] == "application/octet-stream"
    assert len(expected.content) == 4096
    assert result.content == expected.content


# 2. A worker killed mid-job --------------------------------------------------------------------


@pytest.mark.parametrize("stack", [BACKENDS["redis"], BACKENDS["sqlite"]], indirect=True)
def test_a_job_whose_worker_is_killed_mid_call_is_taken_over_and_succeeds(stack, httpbin_url):
    stack.beat()
    first = stack.worker("worker-1")
    key = services.unique("kill")  # README: the job passes it on, for the upstream to dedupe a repeat
    location = stack.submit("/async/delay/3?show_env=1", headers={"Idempotency-Key": key}).headers["Location"]
    job, _ = stack.follow(location, timeout=20, until={"running", *FINAL})
    assert job["status"] == "running" and job["attempts"] == 1, job
    # The worker is in the upstream call (httpbin takes 3 s): kill it, main process and pool
    # children alike, with no chance to acknowledge, requeue or write anything.
    services.wait_until(lambda: '"job started"' in first.text(), 10, "worker-1 started the job", log=first.log)
    killed_at = time.monotonic()
    pids = services.kill_group(first.process)
    assert len(pids) >= 2, pids  # the main process and its prefork pool
    assert '"job ended"' not in first.text()
    left = stack.job(location)
    assert left["status"] == "running" and left["attempts"] == 1, left  # a claim nobody renews

    second = stack.worker("worker-2")
    job, seen = stack.follow(location, timeout=LEASE + 30)
    recovered = time.monotonic() - killed_at
    assert job["status"] == "succeeded", (job, stack.logs())
    assert seen[0] == "running" and "notStarted" not in seen, seen
    assert job["attempts"] == 2, job  # taken over once, by the new worker
    assert '"attempt": 2' in second.text()
    result = requests.get(job["resourceLocation"], timeout=10)
    assert result.status_code == 200
    assert result.json()["url"] == f"{httpbin_url}/delay/3?show_env=1"
    assert result.json()["headers"]["Idempotency-Key"] == key
    # The lease must lapse (LEASE s) before beat's sweep (every 1 s) sends the job again, and
    # then httpbin takes its 3 s; a worker takes a few seconds to start meanwhile.
    assert LEASE < recovered < LEASE + 25, recovered
    print(f"\n{stack.backend}: killed {len(pids)} processes; succeeded {recovered:.1f} s after the kill")


# 3. A backlog with no worker ---------------------------------------------------------------------


@pytest.mark.parametrize("stack", [BACKENDS["redis"], BACKENDS["sqlite"]], indirect=True)
def test_twenty_jobs_submitted_while_no_worker_runs_all_complete_once_one_starts(stack):
    payloads = [f"job number {index}".encode() for index in range(20)]
    paths = [f"/async/base64/{base64.urlsafe_b64encode(payload).decode()}" for payload in payloads]
    with ThreadPoolExecutor(5) as pool:  # five at a time, each on a connection of its own
        locations = [response.headers["Location"] for response in pool.map(stack.submit, paths)]
    assert len(set(locations)) == 20
    assert {stack.job(location)["status"] for location in locations} == {"notStarted"}

    stack.worker(concurrency=4)
    deadline = time.monotonic() + 60
    for location, payload in zip(locations, payloads, strict=True):
        job, _ = stack.follow(location, timeout=max(deadline - time.monotonic(), 1))
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1, job
        result = requests.get(job["resourceLocation"], timeout=10)
        assert result.status_code == 200
        assert result.content == payload


# Also: batches, cancellation -------------------------------------------------------------------


@pytest.mark.parametrize("stack", [BACKENDS["redis"]], indirect=True)
def test_a_batch_of_httpbin_calls_runs_through_a_worker(stack, httpbin_url):
    stack.worker()
    calls = [
        {"path": "/httpbin/bytes/512", "query": {"seed": "3"}},
        {"path": f"/httpbin/base64/{base64.urlsafe_b64encode(b'a batch item').decode()}"},
        {"method": "POST", "path": "/httpbin/anything/x", "json": {"a": [1, 2]}},
        {"path": "/httpbin/status/404"},
        {"path": "/httpbin/delay/1"},
    ]
    submitted = stack.submit("/_gateway/jobs", method="POST", json={"kind": "batch", "requests": calls})
    assert submitted.json()["items"] == {"total": 5, "notStarted": 5}
    job, _ = stack.follow(submitted.headers["Location"], timeout=30)
    assert job["status"] == "succeeded", job
    assert job["kind"] == "batch"
    assert job["progress"] == {"percent": 100, "message": "succeeded"}
    assert job["items"] == {"total": 5, "succeeded": 5}
    result = requests.get(job["resourceLocation"], timeout=10)
    assert result.status_code == 200
    items = result.json()["items"]
    assert [item["index"] for item in items] == [0, 1, 2, 3, 4]
    assert all(item["status"] == "succeeded" and item["error"] is None for item in items), items
    responses = [item["response"] for item in items]
    assert [response["status"] for response in responses] == [200, 200, 200, 404, 200]
    expected = direct(httpbin_url, "/bytes/512?seed=3").content
    assert "body" not in responses[0]  # not UTF-8
    assert base64.b64decode(responses[0]["body_base64"]) == expected
    assert responses[1]["body"] == "a batch item"
    echoed_post = json.loads(responses[2]["body"])
    assert (echoed_post["method"], echoed_post["json"], echoed_post["url"]) == ("POST", {"a": [1, 2]}, f"{httpbin_url}/anything/x")
    assert items[4]["request"] == {"method": "GET", "path": "/httpbin/delay/1", "query": "", "route": "/httpbin"}


@pytest.mark.parametrize("stack", [BACKENDS["redis"]], indirect=True)
def test_a_job_canceled_before_any_worker_started_never_reaches_the_upstream(stack, counting_upstream):
    canceled = stack.submit("/counted/before").headers["Location"]
    answer = requests.delete(canceled, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "canceled"
    again = requests.delete(canceled, timeout=10)
    assert again.status_code == 409
    assert again.json()["type"].endswith("/job-final")
    # A job sent after it is the barrier: one worker process takes the queue in order, so once
    # this one is done, the canceled job's message has been handled too.
    barrier = stack.submit("/counted/after").headers["Location"]
    worker = stack.worker(concurrency=1)
    job, _ = stack.follow(barrier, timeout=30)
    assert job["status"] == "succeeded", job
    services.wait_until(lambda: '"job not claimed"' in worker.text(), 10, "the canceled job's message handled", log=worker.log)
    assert counting_upstream.requests == [("GET", "/after")]
    final = stack.job(canceled)
    assert final["status"] == "canceled" and final["attempts"] == 0, final
    result = requests.get(f"{canceled}/result", timeout=10)
    assert result.status_code == 409
    assert result.json()["type"].endswith("/job-not-succeeded")


@pytest.mark.parametrize(
    "stack", [pytest.param(("redis", {"GATEWAY_JOB_SOFT_TIME_LIMIT": "2"}), marks=pytest.mark.redis, id="redis")], indirect=True
)
def test_a_job_past_the_soft_time_limit_fails_with_job_timeout(stack):
    """Celery's soft time limit (a signal in the pool process) interrupts the upstream call."""
    stack.worker()
    location = stack.submit("/async/delay/8").headers["Location"]
    job, seen = stack.follow(location, timeout=30)
    assert job["status"] == "failed", job
    assert "succeeded" not in seen
    assert job["error"]["type"].endswith("/job-timeout") and job["error"]["status"] == 504, job
    assert job["attempts"] == 1 and job["result"] is None, job
    started, finished = (datetime.fromisoformat(job[k]) for k in ("started_at", "finished_at"))
    assert 1.5 < (finished - started).total_seconds() < 6, job  # the 2 s limit, not httpbin's 8 s
    result = requests.get(f"{location}/result", timeout=10)
    assert result.status_code == 409
