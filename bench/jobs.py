"""Async jobs benchmark: a ``mode: async`` route against a bare ``celery.send_task`` + row, in one run.

Two figures per peer, on loopback, with a no-op upstream:

- submits per second: wrk POSTs to the async route while no Celery worker runs, so only the
  submit path (row, commit, message, 202) is measured;
- submit-to-succeeded latency (p50, p99): one worker (``--concurrency 1``), jobs submitted one
  at a time; each is timed by its row's own timestamps (created_at to finished_at) and, as a
  client sees it, from sending its POST until a poll of its status URL reads ``succeeded``.

The peers are the gateway (gunicorn with gunicorn.conf.py and ``app:create_app()``, a route file
with one async route, ``celery -A tasks worker``) and bench/bare_tasks.py (Flask + SQLAlchemy Core
+ ``send_task`` under the same gunicorn settings, and its own Celery app). See bench/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import redis
from sqlalchemy import (
    DateTime,
    Integer,
    String,
    column,
    create_engine,
    select,
    table,
    text,
)
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from processes import child_env, free_port, start, stop, tree_cpu_seconds

PEERS = ("gateway", "bare")
BODY = b'{"n": 1}'  # what each submit sends; the upstream gets it from the worker
SUBMIT_PATH = "/async"  # the async route on both peers
WARM_JOBS = 10  # per peer, before the latency rounds: worker start-up, pools, first-call paths
JOB_DEADLINE = 30.0  # seconds one job may take before the run is abandoned
NOOP_BODY = b"{}"
WAIT = 10.0  # seconds: the ?wait= of the gateway's waited jobs (its cap, GATEWAY_JOB_WAIT_MAX, is 20)

ROUTE_FILE = """\
# Written by bench/jobs.py for one run.
upstreams:
  noop:
    targets: ["{target}"]
    timeout: {{connect: 1.0, read: 5.0}}
routes:
  - path: /async
    name: async
    upstream: noop
    strip_prefix: true
    methods: [POST]
    auth: none
    rate_limit: none
    mode: async
"""

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


def noop(environ, start_response):
    """The no-op upstream (served by gunicorn as ``jobs:noop``): drain the body, answer 200 ``{}``."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(NOOP_BODY)))])
    return [NOOP_BODY]


# ---------------------------------------------------------------------------------------------
# Processes


def tail(logs: Path, name: str) -> str:
    """The last lines of a process's stderr and stdout files in ``logs``, for an error message."""
    text = ""
    for suffix in ("err", "out"):
        path = logs / f"{name}.{suffix}"
        if path.exists():
            text += f"--- {path.name} ---\n" + path.read_text(errors="replace")[-3000:] + "\n"
    return text


# ---------------------------------------------------------------------------------------------
# HTTP: one keep-alive connection per peer, so polling costs a request and not a handshake


class Client:
    """A keep-alive HTTP/1.1 connection to ``base`` (``http://host:port``)."""

    def __init__(self, base: str):
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers with lower-case names, body)``; reconnects once if the server
        closed the idle connection."""
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                data = response.read()
                return response.status, {k.lower(): v for k, v in response.getheaders()}, data
            except (OSError, http.client.HTTPException):
                self.close()  # the server closed an idle keep-alive connection: reconnect once
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_ready(name: str, base: str, path: str, proc: subprocess.Popen, logs: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    client = Client(base)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if client.request("GET", path)[0] == 200:
                    return
            except OSError:
                client.close()
            time.sleep(0.1)
    finally:
        client.close()
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f} s"
    raise RuntimeError(f"{name} {state}; its output ends:\n{tail(logs, name)}")


# ---------------------------------------------------------------------------------------------
# Database and Redis


@contextlib.contextmanager
def database(tmp: Path) -> Iterator[tuple[str, str]]:
    """Yield ``(sqlalchemy_url, description)``: a fresh Postgres database when BENCH_DATABASE_URL
    or TEST_DATABASE_URL names a server (created here, dropped at the end), else SQLite in ``tmp``."""
    server = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("TEST_DATABASE_URL")
    if not server:
        yield f"sqlite:///{tmp / 'bench.sqlite'}", "SQLite (a file in a temporary directory)"
        return
    url = make_url(server.replace("postgres://", "postgresql://", 1)).set(drivername="postgresql+psycopg")
    name = f"frontdoor_bench_{secrets.token_hex(4)}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise RuntimeError(f"cannot create a database on {url.render_as_string()}: {exc}") from None
    try:
        yield url.set(database=name).render_as_string(hide_password=False), f"PostgreSQL {version} (database {name})"
    finally:
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error as exc:
            print(f"note: could not drop database {name}: {exc}", file=sys.stderr)


def redis_client(redis_url: str):
    return redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=2)


def purge_queues(redis_url: str, prefix: str) -> int:
    """Delete both peers' queued messages (not kombu's bindings); return how many keys."""
    client = redis_client(redis_url)
    keys = [
        key
        for pattern in (f"{prefix}:celery:*", f"{prefix}:bare:*")  # the gateway's and bare_tasks' queues
        for key in client.scan_iter(match=pattern, count=1000)
        if b"_kombu.binding" not in key
    ]
    if keys:
        client.delete(*keys)
    return len(keys)


def delete_keys(redis_url: str, prefix: str) -> None:
    """Remove everything this run left in Redis (best effort)."""
    try:
        client = redis_client(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the report
        print(f"note: could not delete Redis keys {prefix}:*: {exc}", file=sys.stderr)


def row_times(db_url: str, peer: str, ids: list[str]) -> dict[str, tuple]:
    """``{id: (created_at, started_at, finished_at, status, result_status)}`` from the peer's job table."""
    name = "jobs" if peer == "gateway" else "bare_jobs"
    jobs = table(
        name,
        column("id", String),
        column("status", String),
        column("result_status", Integer),
        column("created_at", DateTime),
        column("started_at", DateTime),
        column("finished_at", DateTime),
    )
    engine = create_engine(db_url)
    found: dict[str, tuple] = {}
    try:
        with engine.connect() as conn:
            for start_at in range(0, len(ids), 500):
                query = select(jobs).where(jobs.c.id.in_(ids[start_at:start_at + 500]))
                for row in conn.execute(query):
                    found[row.id] = (row.created_at, row.started_at, row.finished_at, row.status, row.result_status)
    finally:
        engine.dispose()
    return found


def count_rows(db_url: str, peer: str) -> int:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT count(*) FROM {'jobs' if peer == 'gateway' else 'bare_jobs'}")).scalar_one()
    finally:
        engine.dispose()


def delete_rows(db_url: str) -> None:
    """Empty the job tables. TRUNCATE on Postgres: a DELETE would leave dead rows for autovacuum
    to clean up while the latency rounds run."""
    tables = ("job_events", "job_items", "jobs", "bare_jobs")
    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text(f"TRUNCATE {', '.join(tables)}"))
            else:
                for name in tables:
                    conn.execute(text(f"DELETE FROM {name}"))
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# Measuring


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> dict:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.MULTILINE)
    if not (rps and p50 and p99):
        raise RuntimeError(f"cannot parse wrk's output:\n{output}")
    requests = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "rps": float(rps.group(1)),
        "p50": float(p50.group(1)) * UNITS_MS[p50.group(2)],
        "p99": float(p99.group(1)) * UNITS_MS[p99.group(2)],
        "requests": int(requests.group(1)) if requests else 0,
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sockets.groups())) if sockets else 0,
    }


def run_wrk(url: str, script: Path, connections: int, duration: int) -> dict:
    argv = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{duration}s", "--timeout", "5s"]
    done = subprocess.run(
        [*argv, "-s", str(script), "--latency", url], capture_output=True, text=True, timeout=duration + 30, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)


@dataclass
class Sample:
    job_id: str
    accepted_ms: float  # POST sent until its 202 was read
    observed_ms: float  # POST sent until a poll read "succeeded"
    polls: int


@dataclass
class Peer:
    name: str
    base: str
    web: subprocess.Popen
    worker: subprocess.Popen | None = None
    submits: list[dict] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    waited: list[Sample] = field(default_factory=list)  # the gateway's jobs followed with ?wait= instead of polls
    worker_cpu: float = 0.0  # seconds, over the measured jobs
    web_cpu: float = 0.0


def one_job(client: Client, interval: float, worker: subprocess.Popen, wait: float = 0.0) -> Sample:
    """Submit one job and poll its status URL every ``interval`` s until it has succeeded; with
    ``wait`` (seconds), each poll is a ``GET ...?wait=`` that the gateway answers once the job
    has ended (AIP-151's WaitOperation), and the first one is sent at once."""
    sent = time.perf_counter()
    status, headers, body = client.request("POST", SUBMIT_PATH, BODY)
    accepted = time.perf_counter()
    if status != 202:
        raise RuntimeError(f"submit answered {status}: {body[:300]!r}")
    job_id = json.loads(body)["id"]
    poll = urlsplit(headers["location"]).path + (f"?wait={wait:g}" if wait else "")
    polls = 0
    while True:
        if not wait:
            time.sleep(interval)
        status, _, body = client.request("GET", poll)
        polls += 1
        state = json.loads(body).get("status") if status == 200 else None
        if state == "succeeded":
            done = time.perf_counter()
            return Sample(job_id, (accepted - sent) * 1000, (done - sent) * 1000, polls)
        if status != 200 or state in ("failed", "canceled"):
            raise RuntimeError(f"job {job_id}: status {status}, {body[:300]!r}")
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited with {worker.returncode} while job {job_id} was {state}")
        if time.perf_counter() - sent > JOB_DEADLINE:
            raise RuntimeError(f"job {job_id} still {state} after {JOB_DEADLINE:.0f} s")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linear between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def measure(args: argparse.Namespace, tmp: Path, redis_url: str, prefix: str) -> dict:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    celery = str(Path(sys.executable).parent / "celery")
    flask = str(Path(sys.executable).parent / "flask")
    procs: list[subprocess.Popen] = []
    with database(tmp) as (db_url, db_name):
        try:
            ports = {name: free_port() for name in ("upstream", *PEERS)}
            base = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            quiet = ["--log-level", "warning", "--no-control-socket"]
            web_concurrency = os.environ.get("WEB_CONCURRENCY", "2")
            web_threads = os.environ.get("WEB_THREADS", "8")

            procs.append(start("upstream", [
                gunicorn, "--bind", f"127.0.0.1:{ports['upstream']}", "--workers", "1", "--worker-class", "gthread",
                "--threads", "4", *quiet, "--chdir", str(BENCH), "jobs:noop",
            ], child_env(), BENCH, tmp))
            upstream = procs[-1]

            route_file = tmp / "routes.yaml"
            route_file.write_text(ROUTE_FILE.format(target=base["upstream"]))
            gateway_env = child_env(
                PORT=str(ports["gateway"]), HOST="127.0.0.1", WEB_CONCURRENCY=web_concurrency, WEB_THREADS=web_threads,
                REDIS_URL=redis_url, GATEWAY_KEY_PREFIX=prefix, GATEWAY_CONFIG=str(route_file),
                GATEWAY_RATELIMIT_DEFAULT="", DATABASE_URL=db_url,
            )
            bare_env = child_env(
                BARE_DATABASE_URL=db_url, BARE_BROKER_URL=redis_url, BARE_KEY_PREFIX=f"{prefix}:bare",
                BARE_UPSTREAM_URL=base["upstream"], WEB_THREADS=web_threads,
            )
            migrated = subprocess.run(
                [flask, "--app", "app", "db", "upgrade"], cwd=ROOT, env=gateway_env, capture_output=True, text=True,
                timeout=120, check=False,
            )
            if migrated.returncode != 0:
                raise RuntimeError(f"flask db upgrade failed:\n{migrated.stderr[-2000:]}")
            sys.path.insert(0, str(BENCH))
            import bare_tasks  # from bench/, for its table; it reads BARE_* (unset here) at import

            engine = create_engine(db_url)
            bare_tasks.metadata.create_all(engine)
            engine.dispose()

            procs.append(start("gateway", [gunicorn, "--config", "gunicorn.conf.py", "app:create_app()"], gateway_env, ROOT, tmp))
            gateway_web = procs[-1]
            # The same gunicorn settings as the gateway's: gthread, WEB_CONCURRENCY x WEB_THREADS, keep-alive,
            # a listening socket per worker (reuse_port: otherwise one worker may take every wrk connection).
            procs.append(start("bare", [
                gunicorn, "--bind", f"127.0.0.1:{ports['bare']}", "--workers", web_concurrency, "--worker-class",
                "gthread", "--threads", web_threads, "--keep-alive", "75", "--reuse-port", *quiet, "--chdir", str(BENCH), "bare_tasks:web",
            ], bare_env, BENCH, tmp))
            peers = {"gateway": Peer("gateway", base["gateway"], gateway_web), "bare": Peer("bare", base["bare"], procs[-1])}
            wait_ready("upstream", base["upstream"], "/", upstream, tmp)
            wait_ready("gateway", base["gateway"], "/healthz", gateway_web, tmp)
            wait_ready("bare", base["bare"], "/healthz", peers["bare"].web, tmp)
            for peer in peers.values():  # a submit must answer 202 with a status URL
                client = Client(peer.base)
                status, headers, body = client.request("POST", SUBMIT_PATH, BODY)
                client.close()
                if status != 202 or "location" not in headers:
                    raise RuntimeError(f"{peer.name}: POST {SUBMIT_PATH} answered {status} {body[:300]!r}")

            # 1. Submits per second, no worker running: only the submit path.
            script = tmp / "post.lua"
            script.write_text(WRK_SCRIPT.format(body=BODY.decode()))
            for peer in peers.values():
                run_wrk(peer.base + SUBMIT_PATH, script, args.connections, 1)  # warm-up
            print(f"submits: wrk -t2 -c{args.connections} -d{args.duration}s POST {SUBMIT_PATH}, no worker running,"
                  f" {args.rounds} rounds, the order of the peers alternated", flush=True)
            for index in range(args.rounds):
                for name in PEERS if index % 2 == 0 else PEERS[::-1]:
                    peer = peers[name]
                    rows_before = count_rows(db_url, name)
                    cpu_before = tree_cpu_seconds(peer.web.pid)
                    run = run_wrk(peer.base + SUBMIT_PATH, script, args.connections, args.duration)
                    run["cpu_ms"] = (tree_cpu_seconds(peer.web.pid) - cpu_before) * 1000 / max(run["requests"], 1)
                    run["rows"] = count_rows(db_url, name) - rows_before
                    peer.submits.append(run)
                    flags = f"  non-2xx {run['non2xx']}" if run["non2xx"] else ""
                    flags += f"  socket errors {run['socket_errors']}" if run["socket_errors"] else ""
                    print(f"  round {index + 1}  {name:<8}{run['rps']:>9.1f} submits/s  p50 {run['p50']:7.2f} ms"
                          f"  p99 {run['p99']:7.2f} ms  CPU {run['cpu_ms']:.3f} ms/submit  rows +{run['rows']}{flags}",
                          flush=True)

            # The queued messages and rows of part 1 would be the worker's first work: drop them.
            purged = purge_queues(redis_url, prefix)
            delete_rows(db_url)
            print(f"dropped part 1's rows and {purged} Redis queue keys", flush=True)

            # 2. Submit-to-succeeded latency: one worker per peer, concurrency 1, no beat.
            log_level = ["--loglevel", "INFO", "--concurrency", "1"]
            procs.append(start("gateway-worker", [
                celery, "-A", "tasks", "worker", *log_level, "--hostname", f"gateway-{prefix}@%h",
            ], gateway_env, ROOT, tmp))
            peers["gateway"].worker = procs[-1]
            procs.append(start("bare-worker", [
                celery, "-A", "bare_tasks.celery_app", "worker", *log_level, "--hostname", f"bare-{prefix}@%h",
            ], bare_env, BENCH, tmp))
            peers["bare"].worker = procs[-1]
            clients = {name: Client(peer.base) for name, peer in peers.items()}
            for name, peer in peers.items():  # warm-up, and proof that the worker is up (its start-up is in job 1)
                assert peer.worker is not None
                try:
                    for _ in range(WARM_JOBS):
                        one_job(clients[name], args.poll_interval, peer.worker)
                except RuntimeError as exc:
                    raise RuntimeError(f"{name} warm-up: {exc}; the worker's output ends:\n{tail(tmp, f'{name}-worker')}") from None
            per_round = max(1, args.jobs // args.rounds)
            print(f"latency: {per_round * args.rounds} sequential jobs per peer in {args.rounds} rounds, one worker each"
                  f" (--concurrency 1), status polled every {args.poll_interval * 1000:g} ms", flush=True)
            for index in range(args.rounds):
                for name in PEERS if index % 2 == 0 else PEERS[::-1]:
                    peer = peers[name]
                    assert peer.worker is not None
                    worker_before, web_before = tree_cpu_seconds(peer.worker.pid), tree_cpu_seconds(peer.web.pid)
                    samples = [one_job(clients[name], args.poll_interval, peer.worker) for _ in range(per_round)]
                    peer.worker_cpu += tree_cpu_seconds(peer.worker.pid) - worker_before
                    peer.web_cpu += tree_cpu_seconds(peer.web.pid) - web_before
                    peer.samples.extend(samples)
                    observed = [s.observed_ms for s in samples]
                    print(f"  round {index + 1}  {name:<8} p50 {percentile(observed, 50):7.2f} ms"
                          f"  p99 {percentile(observed, 99):7.2f} ms", flush=True)
            # The gateway's own way to follow a job: one GET ...?wait= instead of polls.
            peer = peers["gateway"]
            assert peer.worker is not None
            peer.waited = [one_job(clients["gateway"], args.poll_interval, peer.worker, wait=WAIT) for _ in range(per_round)]
            waited = [s.observed_ms for s in peer.waited]
            print(f"  waited   gateway  p50 {percentile(waited, 50):7.2f} ms  p99 {percentile(waited, 99):7.2f} ms"
                  f"  ({len(waited)} jobs, GET ?wait={WAIT:g} instead of polls)", flush=True)
            for client in clients.values():
                client.close()
            rows = {name: row_times(db_url, name, [s.job_id for s in peer.samples]) for name, peer in peers.items()}
        finally:
            for proc in reversed(procs):
                stop(proc)
            delete_keys(redis_url, prefix)
    return {"peers": peers, "rows": rows, "database": db_name}


# ---------------------------------------------------------------------------------------------
# Report


def ms_between(a, b) -> float:
    return (b - a).total_seconds() * 1000 if a is not None and b is not None else float("nan")


def summarise(measured: dict) -> dict[str, dict]:
    table = {}
    for name, peer in measured["peers"].items():
        rows = measured["rows"][name]
        times = [rows[s.job_id] for s in peer.samples if s.job_id in rows]
        observed = [s.observed_ms for s in peer.samples]
        row_total = [ms_between(c, f) for c, _, f, *_ in times]
        queued = [ms_between(c, s) for c, s, *_ in times]
        running = [ms_between(s, f) for _, s, f, *_ in times]
        jobs = max(len(peer.samples), 1)
        table[name] = {
            "rps": statistics.median(run["rps"] for run in peer.submits),
            "submit_p50": statistics.median(run["p50"] for run in peer.submits),
            "submit_p99": statistics.median(run["p99"] for run in peer.submits),
            "submit_cpu": statistics.median(run["cpu_ms"] for run in peer.submits),
            "non2xx": sum(run["non2xx"] for run in peer.submits),
            "socket_errors": sum(run["socket_errors"] for run in peer.submits),
            "rows_short": sum(max(run["requests"] - run["non2xx"] - run["rows"], 0) for run in peer.submits),
            "p50": percentile(observed, 50),
            "p99": percentile(observed, 99),
            "row_p50": percentile(row_total, 50),
            "row_p99": percentile(row_total, 99),
            "queued_p50": percentile(queued, 50),
            "run_p50": percentile(running, 50),
            "accepted_p50": percentile([s.accepted_ms for s in peer.samples], 50),
            "polls": statistics.mean(s.polls for s in peer.samples) if peer.samples else float("nan"),
            "worker_cpu": peer.worker_cpu * 1000 / jobs,
            "web_cpu": peer.web_cpu * 1000 / jobs,
            "jobs": len(peer.samples),
            "waited_p50": percentile([s.observed_ms for s in peer.waited], 50),
            "waited_p99": percentile([s.observed_ms for s in peer.waited], 99),
            "unsucceeded": sum(1 for t in times if t[3] != "succeeded" or t[4] != 200) + len(peer.samples) - len(times),
        }
    return table


def commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10, check=False
    )
    return done.stdout.strip() or "an unknown commit"


def report(args: argparse.Namespace, measured: dict, redis_url: str) -> None:
    table = summarise(measured)
    gw, bare = table["gateway"], table["bare"]
    print()
    print(f"{platform.node() or 'machine'}: {os.cpu_count()} CPUs, {measured['database']}, code at {commit()},"
          f" Redis at {urlsplit(redis_url).hostname}:{urlsplit(redis_url).port or 6379}")
    print(f"\nsubmits: wrk -c{args.connections} -d{args.duration}s, median of {args.rounds} rounds;"
          f" latency: {gw['jobs']} sequential jobs per peer, one worker, polled every {args.poll_interval * 1000:g} ms")
    print(f"  {'peer':<14}{'submits/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'polled p50':>12}{'polled p99':>12}")
    for name in PEERS:
        row = table[name]
        print(f"  {name:<14}{row['rps']:>10.1f}{row['row_p50']:>9.2f}{row['row_p99']:>9.2f}{row['p50']:>12.2f}{row['p99']:>12.2f}")
    print(f"  {'gateway/bare':<14}{gw['rps'] / bare['rps']:>10.2f}{gw['row_p50'] / bare['row_p50']:>9.2f}"
          f"{gw['row_p99'] / bare['row_p99']:>9.2f}{gw['p50'] / bare['p50']:>12.2f}{gw['p99'] / bare['p99']:>12.2f}")
    print("  p50/p99: submit-to-succeeded from the job rows, created_at -> finished_at; polled: as a client sees it,"
          f" from sending the POST until a poll (every {args.poll_interval * 1000:g} ms) reads 'succeeded'")
    print(f"  gateway waited p50 {gw['waited_p50']:.2f} ms, p99 {gw['waited_p99']:.2f} ms: the POST, then one GET ?wait={WAIT:g}"
          f" answered when the job has ended (x{gw['waited_p50'] / bare['p50']:.2f} of the bare peer's polled p50)")

    print("\nsubmit path (wrk, no worker running)")
    print(f"  {'peer':<10}{'submits/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/submit':>15}{'non-2xx':>9}{'sock err':>10}{'rows short':>12}")
    for name in PEERS:
        row = table[name]
        print(f"  {name:<10}{row['rps']:>10.1f}{row['submit_p50']:>9.2f}{row['submit_p99']:>9.2f}{row['submit_cpu']:>15.3f}"
              f"{row['non2xx']:>9}{row['socket_errors']:>10}{row['rows_short']:>12}")

    print("\nsubmit-to-succeeded, one job at a time (ms; CPU in ms per job)")
    print(f"  {'peer':<10}{'rows p50':>9}{'queued p50':>12}{'run p50':>9}{'polled p50':>12}{'202 p50':>9}{'polls':>7}"
          f"{'worker CPU':>12}{'web CPU':>9}")
    for name in PEERS:
        row = table[name]
        print(f"  {name:<10}{row['row_p50']:>9.2f}{row['queued_p50']:>12.2f}{row['run_p50']:>9.2f}{row['p50']:>12.2f}"
              f"{row['accepted_p50']:>9.2f}{row['polls']:>7.1f}{row['worker_cpu']:>12.2f}{row['web_cpu']:>9.2f}")
    print("  rows: created_at -> finished_at; queued: created_at -> started_at (commit, message, worker pick-up, claim);"
          " run: started_at -> finished_at; 202: POST sent -> 202 read; polls: mean per job;"
          " CPU: the worker's process tree, and the web process tree (submit and polls)")
    problems = []
    for name in PEERS:
        row = table[name]
        if row["non2xx"] or row["socket_errors"]:
            problems.append(f"{name}: {row['non2xx']} non-2xx and {row['socket_errors']} socket errors under wrk")
        if row["rows_short"]:
            problems.append(f"{name}: {row['rows_short']} accepted submits have no row")
        if row["unsucceeded"]:
            problems.append(f"{name}: {row['unsucceeded']} measured jobs are not succeeded with the upstream's 200 in the database")
    for problem in problems:
        print(f"WARNING: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per peer and round (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections for the submit runs (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, the peers' order alternated (default 2)")
    parser.add_argument("--jobs", type=int, default=200, help="sequential jobs per peer for latency (default 200)")
    parser.add_argument("--poll-interval", type=float, default=0.005, help="seconds between polls (default 0.005)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("error: wrk is not on PATH (apt-get install wrk)", file=sys.stderr)
        return 1
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis_client(redis_url).ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is the same answer
        print(f"error: no Redis at {redis_url} ({exc}); set REDIS_URL", file=sys.stderr)
        return 1
    prefix = f"bench-{secrets.token_hex(4)}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup in finally runs
    tmp = Path(tempfile.mkdtemp(prefix="frontdoor-bench-jobs-"))
    try:
        measured = measure(args, tmp, redis_url, prefix)
        report(args, measured, redis_url)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
