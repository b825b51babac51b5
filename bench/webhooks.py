"""Webhook delivery benchmark: the gateway's worker against a naive ``requests.post`` task, in one run.

Deliveries per second to a local receiver, one Celery worker per peer with the same
``--concurrency``, on the same Redis:

- ``gateway``: the gateway's own worker (``celery -A tasks worker -Q webhooks,celery``) running
  ``frontdoor.webhooks.deliver``: claim the row, check the URL, sign with the endpoint's
  (encrypted) secret, POST, log the attempt, set the delivery's state. The events are recorded
  and fanned out in this process (``app.webhooks.messages.record_message`` + ``fan_out``, no HTTP
  publishing) before the clock starts; the clock starts at the first
  ``app.webhooks.delivery.enqueue``;
- ``gateway-fanout``: the same worker, the events recorded here (``record_message``) and their
  fan-out enqueued (``fan_out_later``): the worker makes the delivery rows too;
- ``naive``: bench/naive_webhooks.py, one task per delivery that signs with ``hmac`` and calls
  ``requests.post``; no database at all.

The receiver is bench/webhooks.py's ``receiver`` under gunicorn (its own process): it answers
200 at once and keeps each request's arrival time and headers, so that the end of a run (the
K-th arrival), per-delivery latency (enqueue to arrival) and every signature (checked with the
``standardwebhooks`` library after the run) come from one place for all peers.
``--profile N`` adds an in-process breakdown of ``app.webhooks.delivery.deliver`` (stages timed,
SQL counted, cProfile); ``--py-spy`` samples the gateway's worker during one more burst. See
bench/README.md.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import io
import json
import logging
import os
import platform
import pstats
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from cache import redis_counters
from jobs import (
    commit,
    database,
    delete_keys,
    percentile,
    redis_client,
    tail,
    wait_ready,
)
from processes import child_env, free_port, start, stop, tree_cpu_seconds

PEERS = ("gateway", "gateway-fanout", "naive")
EVENT_TYPE = "bench.event"
RECEIVER_BODY = b'{"ok":true}'
WARM_DELIVERIES = 20  # per worker, before anything is measured: boot, imports, pools, first-call paths
SEQUENTIAL_GAP = 0.02  # seconds between sequential deliveries, so the gateway's record of one ends first
ROUTE_FILE = "# Written by bench/webhooks.py for one run: no routes, the worker only delivers webhooks.\nroutes: []\n"


def event_data(n: int) -> dict:
    """The data of event ``n``: a small JSON object, about 150 bytes once wrapped in the payload."""
    return {"n": n, "order": f"ord_{n:08d}", "amount": 1999, "currency": "EUR", "customer": "cus_bench"}


# ---------------------------------------------------------------------------------------------
# The receiver (served by gunicorn as ``webhooks:receiver``, one worker, threads)

_arrived = threading.Condition()
_seen: dict[str, list] = defaultdict(list)  # label -> [[arrival, webhook-id, timestamp, signature, body]]


def receiver(environ, start_response):
    """``POST /in/<label>``: keep the arrival time and the Standard Webhooks headers, answer 200.
    ``GET /wait?label=&count=&timeout=``: block until ``count`` requests arrived for ``label``
    (or the timeout), answer the count. ``GET /records?label=``: every kept request, as JSON."""
    path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
    if method == "POST" and path.startswith("/in/"):
        arrival = time.time()
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        record = [arrival, environ.get("HTTP_WEBHOOK_ID"), environ.get("HTTP_WEBHOOK_TIMESTAMP"),
                  environ.get("HTTP_WEBHOOK_SIGNATURE"), body.decode("utf-8", "replace")]
        with _arrived:
            _seen[path[4:]].append(record)
            _arrived.notify_all()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(RECEIVER_BODY)))])
        return [RECEIVER_BODY]
    query = {key: values[-1] for key, values in parse_qs(environ.get("QUERY_STRING", "")).items()}
    label = query.get("label", "")
    if path == "/wait":
        count, deadline = int(query.get("count", "1")), time.monotonic() + float(query.get("timeout", "1"))
        with _arrived:
            while len(_seen[label]) < count and (left := deadline - time.monotonic()) > 0:
                _arrived.wait(left)
            data = json.dumps({"count": len(_seen[label])}).encode()
    elif path == "/records":
        with _arrived:
            data = json.dumps(_seen[label]).encode()
    elif path == "/healthz":
        data = b"{}"
    else:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def receiver_get(base: str, path: str, timeout: float = 10.0):
    with urllib.request.urlopen(base + path, timeout=timeout) as response:
        return json.loads(response.read())


def wait_arrivals(base: str, label: str, count: int, deadline: float, workers: list[subprocess.Popen], logs: Path) -> int:
    """Block until the receiver has ``count`` requests for ``label``; raise RuntimeError past
    ``deadline`` (monotonic) or when a worker exits."""
    while True:
        got = receiver_get(base, f"/wait?label={label}&count={count}&timeout=1", timeout=5)["count"]
        if got >= count:
            return got
        for proc in workers:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker exited with {proc.returncode} ({label}: {got} of {count} arrived)")
        if time.monotonic() > deadline:
            names = ("gateway-worker", "naive-worker")
            raise RuntimeError(f"{label}: {got} of {count} deliveries arrived before the deadline; the workers' output ends:\n"
                               + "".join(tail(logs, name) for name in names))


# ---------------------------------------------------------------------------------------------
# Machine counters


def machine_busy() -> tuple[float, float]:
    """``(busy, total)`` jiffies of all CPUs from /proc/stat (busy: everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


def postgres_cpu_seconds() -> float:
    """CPU seconds used so far by every process named ``postgres`` on this machine (the server
    is not in any peer's process tree; other clients of the same server count too)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.index("(") + 1:text.rindex(")")] == "postgres":
            fields = text.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process (not its children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Counters:
    """CPU seconds so far: the worker's and the receiver's process trees, the Redis server, every
    postgres process, this process; the machine's busy and total jiffies; a monotonic clock."""

    worker: float
    main: float
    receiver: float
    redis: float
    postgres: float
    own: float
    busy: float
    total: float
    clock: float

    @classmethod
    def read(cls, worker: subprocess.Popen, receiver_proc: subprocess.Popen, redis_url: str) -> Counters:
        busy, total = machine_busy()
        return cls(tree_cpu_seconds(worker.pid), process_cpu_seconds(worker.pid), tree_cpu_seconds(receiver_proc.pid),
                   redis_counters(redis_url)[1],
                   postgres_cpu_seconds(), time.process_time(), busy, total, time.monotonic())

    def others(self, before: Counters) -> float:
        """CPUs (on average) used by processes that are none of the above: other work on the machine."""
        ours = sum(getattr(self, name) - getattr(before, name) for name in ("worker", "receiver", "redis", "postgres", "own"))
        return max(0.0, ((self.busy - before.busy) / os.sysconf("SC_CLK_TCK") - ours) / (self.clock - before.clock))


# ---------------------------------------------------------------------------------------------
# The gateway's side, in this process: an app on the same database and Redis as its worker


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def gateway_app(env: dict[str, str]):
    """``create_app()`` with the worker's GATEWAY_* / DATABASE_URL / REDIS_URL; its JSON log
    lines go to /dev/null (still formatted: the profile counts them)."""
    from app import create_app

    with environment(env):
        app = create_app()
    null = open(os.devnull, "w")  # noqa: SIM115 - open for the life of the process
    for handler in logging.getLogger("frontdoor").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(null)
    return app


def new_endpoint(label: str, url: str, secret: str) -> str:
    """A consumer of its own with one endpoint (every event type) at ``url``; return its id.
    A consumer per label: fan-out makes a delivery for every enabled endpoint of the consumer."""
    from app.extensions import db
    from app.models import Consumer
    from app.webhooks import endpoints

    consumer = Consumer(name=f"bench-{label}-{secrets.token_hex(3)}")
    db.session.add(consumer)
    db.session.commit()
    endpoint, _ = endpoints.create(consumer.id, url, f"bench {label}", [], secret, False)
    return endpoint.id


def record_events(endpoint_id: str, count: int, fan_out: bool) -> list[tuple[str, str]]:
    """Record ``count`` messages for the endpoint's consumer (and, with ``fan_out``, make their
    deliveries with ``fan_out``); return ``[(message_id, delivery_id or '')]``."""
    from app.extensions import db
    from app.models import WebhookEndpoint
    from app.webhooks import messages

    consumer_id = db.session.get(WebhookEndpoint, endpoint_id).consumer_id
    made = []
    for n in range(count):
        message, _ = messages.record_message(consumer_id, EVENT_TYPE, event_data(n))
        message_id = message.id
        delivery_ids = messages.fan_out(message_id) if fan_out else [""]
        if len(delivery_ids) != 1:
            raise RuntimeError(f"fan-out of {message_id} made {len(delivery_ids)} deliveries, not 1")
        made.append((message_id, delivery_ids[0]))
    db.session.remove()
    return made


def delivery_rows(endpoint_id: str) -> tuple[list, dict]:
    """The endpoint's deliveries and their attempts (by delivery id)."""
    from sqlalchemy import select

    from app.extensions import db
    from app.models import WebhookAttempt, WebhookDelivery

    d, a = WebhookDelivery, WebhookAttempt
    rows = db.session.execute(
        select(d.id, d.message_id, d.status, d.attempts, d.last_attempt_at, d.finished_at).where(d.endpoint_id == endpoint_id)
    ).all()
    attempts: dict[str, list] = defaultdict(list)
    for row in db.session.execute(select(a.delivery_id, a.created_at, a.duration_ms, a.status_code).where(a.endpoint_id == endpoint_id)):
        attempts[row.delivery_id].append(row)
    db.session.rollback()  # no read snapshot held (SQLite WAL, Postgres) while workers write
    return rows, attempts


def wait_final(endpoint_id: str, count: int, deadline: float) -> tuple[list, dict]:
    """Poll (every 50 ms) until ``count`` deliveries of the endpoint are succeeded or failed."""
    while True:
        rows, attempts = delivery_rows(endpoint_id)
        if len(rows) >= count and all(row.status in ("succeeded", "failed") for row in rows):
            return rows, attempts
        if time.monotonic() > deadline:
            states = defaultdict(int)
            for row in rows:
                states[row.status] += 1
            raise RuntimeError(f"deliveries of {endpoint_id} not final: {dict(states)} of {count}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# One peer's work


@dataclass
class Peer:
    name: str
    worker: subprocess.Popen
    runs: list[dict] = field(default_factory=list)
    sequential: dict = field(default_factory=dict)


class Harness:
    """What every run needs: the receiver, the app (gateway peers), the naive task, the secret."""

    def __init__(self, args, app, receiver_base: str, receiver_proc: subprocess.Popen, redis_url: str, secret: str, logs: Path):
        self.args, self.app, self.base, self.receiver_proc = args, app, receiver_base, receiver_proc
        self.redis_url, self.secret, self.logs = redis_url, secret, logs
        self.workers: list[subprocess.Popen] = []
        self.labels = 0

    def label(self, peer: str, what: str) -> str:
        self.labels += 1
        return f"{peer}-{what}-{self.labels}"

    def prepare(self, peer: str, label: str, count: int) -> dict:
        """What ``send`` needs for ``count`` deliveries of ``peer`` to the receiver at ``/in/<label>``."""
        url = f"{self.base}/in/{label}"
        if peer == "naive":
            from app.models import WebhookMessage
            from app.models.base import new_id, utcnow
            from app.webhooks.messages import payload

            items = []
            with self.app.app_context():
                for n in range(count):  # the gateway's own body format, without its tables
                    message = WebhookMessage(id=new_id("msg"), type=EVENT_TYPE, data=event_data(n), created_at=utcnow())
                    items.append((message.id, payload(message).decode()))
            return {"peer": peer, "label": label, "url": url, "items": items}
        with self.app.app_context():
            endpoint_id = new_endpoint(label, url, self.secret)
            items = record_events(endpoint_id, count, fan_out=peer == "gateway")
        return {"peer": peer, "label": label, "endpoint_id": endpoint_id, "items": items}

    def send_one(self, work: dict, item) -> None:
        peer = work["peer"]
        if peer == "naive":
            import naive_webhooks

            naive_webhooks.deliver.apply_async((work["url"], item[0], item[1]))
        elif peer == "gateway":
            from app.webhooks import delivery

            if delivery.enqueue([item[1]]):
                raise RuntimeError(f"could not enqueue delivery {item[1]}")
        else:
            from app.webhooks import messages

            messages.fan_out_later([item[0]])

    def burst(self, peer: Peer, work: dict) -> dict:
        """Enqueue every delivery of ``work`` at once; wait for the K-th arrival (and, for the
        gateway, for every row to be final). Returns the run's figures."""
        count = len(work["items"])
        before = Counters.read(peer.worker, self.receiver_proc, self.redis_url)
        enqueued: dict[str, float] = {}
        with self.app.app_context():
            first = time.time()
            for item in work["items"]:
                enqueued[item[0]] = time.time()
                self.send_one(work, item)
            enqueue_seconds = time.time() - first
            deadline = time.monotonic() + self.args.deadline
            wait_arrivals(self.base, work["label"], count, deadline, self.workers, self.logs)
            after = Counters.read(peer.worker, self.receiver_proc, self.redis_url)
            rows, attempts = wait_final(work["endpoint_id"], count, deadline) if peer.name != "naive" else ([], {})
        records = receiver_get(self.base, f"/records?label={work['label']}")
        last_arrival = max(r[0] for r in records)
        run = {
            "count": count,
            "enqueue_s": enqueue_seconds,
            "arrival_rate": count / (last_arrival - first),
            "latency": [r[0] - enqueued[r[1]] for r in records if r[1] in enqueued],
            "duplicates": len(records) - len({r[1] for r in records}),
            "unknown": sum(1 for r in records if r[1] not in enqueued),
            "bad_signatures": self.verify(records),
            "worker_cpu": (after.worker - before.worker) * 1000 / count,
            "main_cpu": (after.main - before.main) * 1000 / count,
            "receiver_cpu": (after.receiver - before.receiver) * 1000 / count,
            "redis_cpu": (after.redis - before.redis) * 1000 / count,
            "postgres_cpu": (after.postgres - before.postgres) * 1000 / count,
            "busy": (after.busy - before.busy) / max(after.total - before.total, 1),
            "others": after.others(before),
        }
        run["rate"] = run["arrival_rate"]
        if rows:
            finished = max(row.finished_at for row in rows).timestamp()
            run["rate"] = count / (finished - first)  # the brief's end: the last row succeeded
            run["not_succeeded"] = sum(1 for row in rows if row.status != "succeeded")
            run["retried"] = sum(1 for row in rows if row.attempts > 1)
            firsts = [min(attempts[row.id], key=lambda a: a.created_at) for row in rows if attempts[row.id]]
            run["http_ms"] = [a.duration_ms for a in firsts]
            # claim -> record: the claim's clock reading (last_attempt_at) to the attempt row's
            run["service_ms"] = [
                (attempts[row.id][-1].created_at - row.last_attempt_at).total_seconds() * 1000
                for row in rows if attempts[row.id] and row.last_attempt_at is not None
            ]
        return run

    def one_at_a_time(self, peer: Peer, work: dict) -> dict:
        """Deliveries sent one after another: enqueue, wait for its arrival, pause, next."""
        enqueued: dict[str, float] = {}
        with self.app.app_context():
            for index, item in enumerate(work["items"], 1):
                enqueued[item[0]] = time.time()
                self.send_one(work, item)
                wait_arrivals(self.base, work["label"], index, time.monotonic() + 30, self.workers, self.logs)
                time.sleep(SEQUENTIAL_GAP)
            rows, _ = (wait_final(work["endpoint_id"], len(work["items"]), time.monotonic() + 30)
                       if peer.name != "naive" else ([], {}))
        records = receiver_get(self.base, f"/records?label={work['label']}")
        result = {"latency": [r[0] - enqueued[r[1]] for r in records if r[1] in enqueued], "bad_signatures": self.verify(records)}
        if rows:
            result["recorded"] = [row.finished_at.timestamp() - enqueued[row.message_id] for row in rows]
            result["not_succeeded"] = sum(1 for row in rows if row.status != "succeeded")
        return result

    def verify(self, records: list) -> int:
        """How many of ``records`` a Standard Webhooks verifier rejects (the endpoint's secret)."""
        from standardwebhooks import Webhook

        hook, bad = Webhook(self.secret), 0
        for _, message_id, timestamp, signature, body in records:
            try:
                hook.verify(body, {"webhook-id": message_id, "webhook-timestamp": timestamp, "webhook-signature": signature})
            except Exception:  # noqa: BLE001 - any rejection counts
                bad += 1
        return bad


# ---------------------------------------------------------------------------------------------
# The in-process profile of app.webhooks.delivery.deliver


class Stages:
    """Wall and CPU time per wrapped function (module attributes replaced for the profile's
    duration, so that ``deliver`` calls the wrappers), plus what goes to the database: statements
    (by kind, and by the innermost wrapped function they run in), pool checkouts (each with its
    pre-ping), transactions begun, commits and rollbacks."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.statements: dict[str, int] = defaultdict(int)
        self.sql_wall = 0.0
        self.by_stage: dict[str, int] = defaultdict(int)
        self.events: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []
        self.patched: list[tuple[object, str, object]] = []
        self.labels: list[str] = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            self.stack.append(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()
                self.wall[label] += time.perf_counter() - wall
                self.cpu[label] += time.thread_time() - cpu
                self.calls[label] += 1

        self.patched.append((owner, name, original))
        self.labels.append(label)
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self.patched):
            setattr(owner, name, original)
        self.patched.clear()


def profile(args, app, receiver_base: str, secret: str) -> dict:
    """Call ``deliver`` ``--profile`` times in this process (stages timed), then as many again
    under cProfile, then the naive task's function as many times; return what was measured."""
    import naive_webhooks
    from sqlalchemy import event

    from app import webhooks
    from app.extensions import db
    from app.webhooks import delivery, endpoints, messages
    from app.webhooks import secrets as webhook_secrets

    count = args.profile
    out: dict = {"count": count}
    with app.app_context():
        endpoint_id = new_endpoint("profile", f"{receiver_base}/in/profile", secret)
        items = record_events(endpoint_id, WARM_DELIVERIES + 2 * count, fan_out=True)
        for _, delivery_id in items[:WARM_DELIVERIES]:
            delivery.deliver(delivery_id)
        stages = Stages()
        guard = webhooks.settings().guard
        for owner, name, label in (
            (delivery, "claim", "claim"),
            (delivery, "attempt", "attempt"),
            (messages, "with_data", "attempt: with_data (message + data)"),
            (endpoints, "signing_secrets", "attempt: signing_secrets (Fernet decrypt)"),
            (messages, "payload", "attempt: payload (JSON body)"),
            (guard, "check", "attempt: guard.check (resolve + check)"),
            (webhook_secrets, "sign", "attempt: secrets.sign (standardwebhooks)"),
            (delivery, "send", "attempt: sender.send (HTTP POST)"),
            (delivery, "record", "record"),
            (delivery, "_track_health", "record: _track_health"),
            (delivery, "_waiting", "_waiting"),
            (delivery, "enqueue", "enqueue"),
        ):
            stages.wrap(owner, name, label)
        engine = db.engine

        def before(conn, cursor, statement, parameters, context, executemany):
            stages.statements[statement.lstrip().split(None, 1)[0].upper()] += 1
            stages.by_stage[stages.stack[-1] if stages.stack else "-"] += 1
            conn.info["bench_started"] = time.perf_counter()

        def after(conn, cursor, statement, parameters, context, executemany):
            stages.sql_wall += time.perf_counter() - conn.info.pop("bench_started", time.perf_counter())

        counters = {name: (lambda *_, name=name: stages.events.__setitem__(name, stages.events[name] + 1))
                    for name in ("checkout", "begin", "commit", "rollback")}
        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        for name, counter in counters.items():
            event.listen(engine, name, counter)
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            outcomes = defaultdict(int)
            for _, delivery_id in items[WARM_DELIVERIES:WARM_DELIVERIES + count]:
                outcomes[delivery.deliver(delivery_id)] += 1
        finally:
            out["wall"], out["cpu"] = time.perf_counter() - wall, time.process_time() - cpu
            event.remove(engine, "before_cursor_execute", before)
            event.remove(engine, "after_cursor_execute", after)
            for name, counter in counters.items():
                event.remove(engine, name, counter)
            stages.restore()
        out["stages"], out["outcomes"] = stages, dict(outcomes)
        out["pre_ping"] = bool(app.config["SQLALCHEMY_ENGINE_OPTIONS"].get("pool_pre_ping"))

        profiler = cProfile.Profile()
        profiler.enable()
        for _, delivery_id in items[WARM_DELIVERIES + count:]:
            delivery.deliver(delivery_id)
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"app/|requests/(api|sessions)|sqlalchemy/orm/session|standardwebhooks|fernet|json/", 40)
        out["cprofile"] = text.getvalue()

    # The naive task's function, called directly (no Celery): its floor per delivery.
    url = f"{receiver_base}/in/profile-naive"
    naive_items = [(secrets.token_hex(8), json.dumps({"type": EVENT_TYPE, "data": event_data(n)})) for n in range(WARM_DELIVERIES + count)]
    for message_id, body in naive_items[:WARM_DELIVERIES]:
        naive_webhooks.deliver.run(url, message_id, body)
    wall, cpu = time.perf_counter(), time.process_time()
    for message_id, body in naive_items[WARM_DELIVERIES:]:
        naive_webhooks.deliver.run(url, message_id, body)
    out["naive_wall"], out["naive_cpu"] = time.perf_counter() - wall, time.process_time() - cpu
    return out


# ---------------------------------------------------------------------------------------------
# py-spy on the gateway's worker (--py-spy): one more gateway burst, sampled, not in the rates

# Inclusive shares: a sample counts for a row when a frame of its stack matches (``name (file``).
SPY_STAGES = (
    ("deliver", r"^deliver \(.*app/webhooks/delivery\.py"),
    ("  claim", r"^claim \(.*app/webhooks/delivery\.py"),
    ("  attempt", r"^attempt \(.*app/webhooks/delivery\.py"),
    ("    sender.send (HTTP)", r"^send \(.*app/webhooks/sender\.py"),
    ("  record", r"^record \(.*app/webhooks/delivery\.py"),
    ("    _track_health", r"^_track_health \(.*app/webhooks/delivery\.py"),
    ("    the attempt's log line", r"^Logger\.info \(logging/"),
    ("  _waiting", r"^_waiting \(.*app/webhooks/delivery\.py"),
    ("  enqueue", r"^enqueue \(.*app/webhooks/delivery\.py"),
)
# Across deliver: where its samples end up, by library.
SPY_LAYERS = (
    ("COMMIT (the driver's commit)", r"(^|\.)do_commit \(sqlalchemy/engine"),
    ("statements in the driver (cursor.execute)", r"(^|\.)do_execute \(sqlalchemy/engine"),
    ("SQLAlchemy, the rest (ORM, compile, results)", r"\(sqlalchemy/"),
    ("requests + urllib3 + http.client", r"\((requests|urllib3)/|\(http/client\.py"),
    ("threading (the deadline Timer)", r"\(threading\.py"),
)


SPY_RATE = 100  # samples per second and thread


def spy_start(path: str, pid: int, out: Path, logs: Path) -> subprocess.Popen:
    return start("py-spy", [path, "record", "--pid", str(pid), "--subprocesses", "--rate", str(SPY_RATE), "--format", "raw",
                            "--output", str(out), "--nonblocking"], child_env(), ROOT, logs)


def spy_stop(proc: subprocess.Popen) -> None:
    """SIGINT: py-spy writes its file and exits."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        stop(proc)


def spy_summary(raw: Path) -> dict:
    """Shares of py-spy's raw (collapsed) samples: by process, by stage of ``deliver`` (inclusive),
    by library across ``deliver``, and the functions with the most own samples."""
    import re

    stages = [(label, re.compile(pattern)) for label, pattern in SPY_STAGES]
    layers = [(label, re.compile(pattern)) for label, pattern in SPY_LAYERS]
    total, main, counts, layer_counts, leaves = 0, 0, defaultdict(int), defaultdict(int), defaultdict(int)
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        samples = int(n)
        frames = stack.split(";")
        processes = sum(1 for frame in frames if frame.startswith("process "))
        total += samples
        if processes < 2:  # the worker's main process: the consumer (Redis, acks, the pool's pipes)
            main += samples
            continue
        code = [frame for frame in frames if not frame.startswith(("process ", "thread "))]
        # A stage counts when its frame is below its parent's (the rows are nested by indentation).
        found: dict[int, int] = {}  # indentation -> index of the frame that matched at that depth
        for label, pattern in stages:
            depth = (len(label) - len(label.lstrip())) // 2
            begin = found.get(depth - 1, -1) + 1 if depth else 0
            found = {d: i for d, i in found.items() if d < depth}
            index = next((i for i in range(begin, len(code)) if pattern.search(code[i])), None)
            if index is not None and (depth == 0 or depth - 1 in found):
                found[depth] = index
                counts[label] += samples
        if any(stages[0][1].search(frame) for frame in code):
            inner = code[next(i for i, frame in enumerate(code) if stages[0][1].search(frame)):]
            for label, pattern in layers:  # first match from the leaf up, so each sample counts once
                if any(pattern.search(frame) for frame in inner):
                    layer_counts[label] += samples
                    break
            else:
                layer_counts["the gateway's own code and the rest"] += samples
        if code:
            leaves[code[-1]] += samples
    return {"total": total, "main": main, "stages": dict(counts), "layers": dict(layer_counts),
            "leaves": sorted(leaves.items(), key=lambda kv: -kv[1])[:15]}


# ---------------------------------------------------------------------------------------------
# The run


def measure(args, tmp: Path, redis_url: str, prefix: str) -> dict:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    celery = str(Path(sys.executable).parent / "celery")
    flask = str(Path(sys.executable).parent / "flask")
    procs: list[subprocess.Popen] = []
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    with database(tmp) as (db_url, db_name):
        try:
            port = free_port()
            receiver_base = f"http://127.0.0.1:{port}"
            procs.append(start("receiver", [
                gunicorn, "--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "gthread", "--threads", "8",
                "--log-level", "warning", "--no-control-socket", "--chdir", str(BENCH), "webhooks:receiver",
            ], child_env(), BENCH, tmp))
            receiver_proc = procs[-1]

            route_file = tmp / "routes.yaml"
            route_file.write_text(ROUTE_FILE)
            gateway_env = {
                "DATABASE_URL": db_url, "REDIS_URL": redis_url, "GATEWAY_KEY_PREFIX": prefix, "GATEWAY_CONFIG": str(route_file),
                "GATEWAY_RATELIMIT_DEFAULT": "", "GATEWAY_WEBHOOK_ALLOW_HTTP": "true",
                "GATEWAY_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]', "GATEWAY_WEBHOOK_SECRET_KEYS": secrets.token_urlsafe(36),
            }
            naive_env = {"NAIVE_BROKER_URL": redis_url, "NAIVE_KEY_PREFIX": f"{prefix}:naive", "NAIVE_SECRET": secret}
            migrated = subprocess.run(
                [flask, "--app", "app", "db", "upgrade"], cwd=ROOT, env=child_env(**gateway_env), capture_output=True, text=True,
                timeout=120, check=False,
            )
            if migrated.returncode != 0:
                raise RuntimeError(f"flask db upgrade failed:\n{migrated.stderr[-2000:]}")
            app = gateway_app(gateway_env)
            if app.extensions["webhooks"].endpoint_concurrency < args.concurrency:
                # The per-endpoint cap would hold the worker's extra processes back: raise it to N.
                gateway_env["GATEWAY_WEBHOOK_ENDPOINT_CONCURRENCY"] = str(args.concurrency)
                app = gateway_app(gateway_env)
            os.environ.update(naive_env)  # read by naive_webhooks at import, in this process too
            import naive_webhooks  # noqa: F401 - the task this process enqueues

            wait_ready("receiver", receiver_base, "/healthz", receiver_proc, tmp)
            harness = Harness(args, app, receiver_base, receiver_proc, redis_url, secret, tmp)
            peers: dict[str, Peer] = {}
            spied = None
            if args.rounds > 0:
                worker_args = ["worker", "--loglevel", "INFO", "--concurrency", str(args.concurrency), "--pool", "prefork"]
                procs.append(start("gateway-worker", [
                    celery, "-A", "tasks", *worker_args, "-Q", "webhooks,celery", "--hostname", f"gateway-{prefix}@%h",
                ], child_env(**gateway_env), ROOT, tmp))
                gateway_worker = procs[-1]
                procs.append(start("naive-worker", [
                    celery, "-A", "naive_webhooks.celery_app", *worker_args, "--hostname", f"naive-{prefix}@%h",
                ], child_env(**naive_env), BENCH, tmp))
                harness.workers = [gateway_worker, procs[-1]]
                peers = {name: Peer(name, procs[-1] if name == "naive" else gateway_worker) for name in PEERS}
                for name in ("gateway", "naive"):  # the first ones wait for the worker to boot
                    work = harness.prepare(name, harness.label(name, "warm"), WARM_DELIVERIES)
                    try:
                        harness.burst(peers[name], work)
                    except RuntimeError as exc:
                        raise RuntimeError(f"{name} warm-up: {exc}") from None
                print(f"{args.events} events per peer and round, {args.rounds} rounds, the peers' order rotated;"
                      f" one worker per peer, --concurrency {args.concurrency} (prefork)", flush=True)
                for index in range(args.rounds):
                    order = PEERS[index % len(PEERS):] + PEERS[:index % len(PEERS)]
                    works = {name: harness.prepare(name, harness.label(name, f"r{index + 1}"), args.events) for name in order}
                    for name in order:
                        run = harness.burst(peers[name], works[name])
                        peers[name].runs.append(run)
                        print(f"  round {index + 1}  {name:<15}{run['rate']:>8.1f} deliveries/s  enqueue-to-arrival p50"
                              f" {percentile(run['latency'], 50) * 1000:8.1f} ms  worker CPU {run['worker_cpu']:.2f} ms/delivery"
                              f"  machine busy {run['busy'] * 100:.0f}%, other processes {run['others']:.2f} CPUs", flush=True)
                if args.sequential:
                    for name in PEERS:
                        work = harness.prepare(name, harness.label(name, "seq"), args.sequential)
                        peers[name].sequential = harness.one_at_a_time(peers[name], work)
                if args.py_spy:
                    work = harness.prepare("gateway", harness.label("gateway", "py-spy"), args.events)
                    out = tmp / "py-spy.txt"
                    spy = spy_start(args.py_spy, peers["gateway"].worker.pid, out, tmp)
                    time.sleep(1.0)  # py-spy attaches to the worker and its pool processes
                    run = harness.burst(peers["gateway"], work)
                    spy_stop(spy)
                    if not out.exists():
                        raise RuntimeError(f"py-spy wrote nothing; its output ends:\n{tail(tmp, 'py-spy')}")
                    spied = {"run": run, **spy_summary(out)}
                for proc in harness.workers:
                    stop(proc)
            profiled = profile(args, app, receiver_base, secret) if args.profile else None
        finally:
            for proc in reversed(procs):
                stop(proc)
            delete_keys(redis_url, prefix)
    return {"peers": peers, "database": db_name, "profile": profiled, "spy": spied}


# ---------------------------------------------------------------------------------------------
# Report


def ms(values: list[float], q: float, scale: float = 1000.0) -> float:
    return percentile(values, q) * scale


def code_digest() -> str:
    """A short hash of the webhook code the run measures (app/webhooks, its models, its tasks):
    compared before and after, it shows whether the tree changed under the run."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted([*(ROOT / "app" / "webhooks").glob("*.py"), ROOT / "app" / "models" / "webhooks.py", ROOT / "tasks" / "webhooks.py"]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def report(args, measured: dict, redis_url: str) -> None:
    peers: dict[str, Peer] = measured["peers"]
    parts = urlsplit(redis_url)
    print()
    print(f"{platform.node() or 'machine'}: {os.cpu_count()} CPUs, {measured['database']}, code at {commit()},"
          f" Redis at {parts.hostname}:{parts.port or 6379}, Python {platform.python_version()}")
    if measured["code"][0] != measured["code"][1]:
        print(f"WARNING: the webhook code changed during the run (digest {measured['code'][0]} -> {measured['code'][1]})")
    else:
        print(f"webhook code digest {measured['code'][0]} (app/webhooks, models, tasks), unchanged during the run")
    if peers:
        print(f"\ndeliveries/s to a local receiver (gunicorn gthread, 1 worker x 8 threads, answers 200 at once),"
              f" {args.events} events per round, median of {args.rounds} rounds;")
        print(f"one Celery worker per peer, --concurrency {args.concurrency} (prefork), Redis broker, late acks, prefetch 1")
        print("  gateway: events recorded and fanned out in this process (app.webhooks.messages.record_message + fan_out, no HTTP"
              " publishing) before the clock;\n    clock from the first app.webhooks.delivery.enqueue to the last delivery"
              " row's finished_at (succeeded); attempt logging on")
        print("  gateway-fanout: events recorded here (record_message), clock from the first fan_out_later: the worker"
              " runs fan_out, then deliver")
        print("  naive: bench/naive_webhooks.py, hmac + requests.post per task, no database; clock to the receiver's K-th arrival")
        print(f"\n  {'peer':<16}{'deliv/s':>9}{'rounds':>22}{'burst p50':>11}{'p99':>9}{'worker CPU':>12}{'main':>6}"
              f"{'receiver':>10}{'Redis':>7}{'Postgres':>10}{'busy':>6}{'others':>8}")
        table = {}
        for name in PEERS:
            runs = peers[name].runs
            row = table[name] = {
                "rate": statistics.median(r["rate"] for r in runs),
                "p50": statistics.median(ms(r["latency"], 50) for r in runs),
                "p99": statistics.median(ms(r["latency"], 99) for r in runs),
            }
            for key in ("worker_cpu", "main_cpu", "receiver_cpu", "redis_cpu", "postgres_cpu", "busy", "others"):
                row[key] = statistics.median(r[key] for r in runs)
            rounds = " ".join(f"{r['rate']:.0f}" for r in runs)
            postgres = f"{row['postgres_cpu']:>10.2f}" if measured["database"].startswith("PostgreSQL") else f"{'-':>10}"
            print(f"  {name:<16}{row['rate']:>9.1f}{rounds:>22}{row['p50']:>9.0f}ms{row['p99']:>7.0f}ms{row['worker_cpu']:>12.2f}{row['main_cpu']:>6.2f}"
                  f"{row['receiver_cpu']:>10.2f}{row['redis_cpu']:>7.2f}{postgres}{row['busy'] * 100:>5.0f}%{row['others']:>8.2f}")
        print("  burst p50/p99: enqueue to arrival at the receiver, all K enqueued at once (mostly queueing behind the"
              " others); CPU columns: ms per delivery of the worker's process tree, of its main process alone (the consumer), the receiver's, the Redis server's"
              " and every postgres process's (other clients included); busy: all CPUs over the run, from /proc/stat; others: CPUs used meanwhile by processes outside the run")
        naive = table["naive"]["rate"]
        for name in ("gateway", "gateway-fanout"):
            print(f"  {name}/naive deliveries/s: {table[name]['rate'] / naive:.2f}   worker CPU per delivery"
                  f" x{table[name]['worker_cpu'] / table['naive']['worker_cpu']:.2f} of naive's")
        gw = peers["gateway"].runs
        print(f"  gateway rows: claim-to-record p50 {statistics.median(ms(r['service_ms'], 50, 1) for r in gw):.2f} ms"
              f" (last_attempt_at to the attempt's created_at), HTTP p50 {statistics.median(ms(r['http_ms'], 50, 1) for r in gw):.0f} ms"
              f" (duration_ms, whole ms), deliveries/s to the receiver's K-th arrival"
              f" {statistics.median(r['arrival_rate'] for r in gw):.1f}; enqueueing {args.events} took"
              f" {statistics.median(r['enqueue_s'] for r in gw) * 1000:.0f} ms (gateway),"
              f" {statistics.median(r['enqueue_s'] for r in peers['naive'].runs) * 1000:.0f} ms (naive)")
        if args.sequential:
            print(f"\none at a time ({args.sequential} per peer, {SEQUENTIAL_GAP * 1000:g} ms apart), enqueue to arrival at the receiver:")
            for name in PEERS:
                seq = peers[name].sequential
                extra = (f"   enqueue to row finished_at p50 {ms(seq['recorded'], 50):.2f} ms" if "recorded" in seq else "")
                print(f"  {name:<16}p50 {ms(seq['latency'], 50):6.2f} ms  p99 {ms(seq['latency'], 99):6.2f} ms{extra}")
        problems = []
        for name in PEERS:
            runs = peers[name].runs + ([peers[name].sequential] if peers[name].sequential else [])
            for key, what in (("duplicates", "webhook-ids seen twice"), ("unknown", "unexpected requests"),
                              ("bad_signatures", "signatures a Standard Webhooks verifier rejected"),
                              ("not_succeeded", "deliveries not succeeded"), ("retried", "deliveries retried")):
                total = sum(r.get(key, 0) for r in runs)
                if total:
                    problems.append(f"{name}: {total} {what}")
        for problem in problems:
            print(f"WARNING: {problem}")
        if not problems:
            print("  every delivery arrived once with a signature standardwebhooks verifies; every gateway row succeeded on its first attempt")
    if measured["spy"]:
        report_spy(measured["spy"])
    if measured["profile"]:
        report_profile(measured["profile"])


def report_spy(spied: dict) -> None:
    run, total = spied["run"], max(spied["total"], 1)
    per = 1000 / SPY_RATE / run["count"]  # ms per delivery that one sample stands for
    print(f"\npy-spy on the gateway worker (main + pool processes), one more gateway burst of {run['count']}"
          f" ({run['rate']:.1f} deliveries/s, {run['worker_cpu']:.2f} ms worker CPU per delivery, not in the rates above);"
          f" {spied['total']} samples at {SPY_RATE} Hz;")
    print("py-spy's default (no --idle) leaves out a process waiting for work, not one waiting for the CPU or the disk:"
          " ms/delivery is sampled time (samples / rate / deliveries), wall time summed over the processes")
    print(f"  {'where':<50}{'share':>7}{'ms/delivery':>13}")

    def row(label: str, samples: int) -> None:
        print(f"  {label:<50}{samples * 100 / total:>6.1f}%{samples * per:>13.2f}")

    row("Celery main process (consumer, acks, pool pipes)", spied["main"])
    pool = total - spied["main"]
    row("pool processes", pool)
    row("  outside deliver (Celery's trace, app context)", pool - spied["stages"].get("deliver", 0))
    for label, _ in SPY_STAGES:
        row(f"  {label}", spied["stages"].get(label, 0))
    print("  deliver's samples by where they end (first match from the leaf up):")
    for label, samples in sorted(spied["layers"].items(), key=lambda kv: -kv[1]):
        row(f"    {label}", samples)
    print("  functions with the most own samples:")
    for frame, samples in spied["leaves"]:
        row(f"    {frame[:46]}", samples)


def report_profile(out: dict) -> None:
    count, stages = out["count"], out["stages"]
    print(f"\nin one process, app.webhooks.delivery.deliver called {count} times in a loop (after {WARM_DELIVERIES}"
          f" unmeasured), outcomes {out['outcomes']}:")
    print(f"  per delivery: {out['wall'] * 1000 / count:.2f} ms wall, {out['cpu'] * 1000 / count:.2f} ms CPU (process);"
          f" the naive task's function called directly: {out['naive_wall'] * 1000 / count:.2f} ms wall,"
          f" {out['naive_cpu'] * 1000 / count:.2f} ms CPU")
    print(f"  {'stage':<46}{'calls':>7}{'wall ms':>9}{'CPU ms':>8}{'SQL':>6}   (per delivery; SQL: statements run in it, not in a stage below)")
    for label in stages.labels:
        indent = "    " if ":" in label else "  "
        name = label.split(": ", 1)[-1]
        print(f"  {indent}{name:<{44 - len(indent) + 2}}{stages.calls[label] / count:>7.1f}{stages.wall[label] * 1000 / count:>9.3f}"
              f"{stages.cpu[label] * 1000 / count:>8.3f}{stages.by_stage[label] / count:>6.1f}")
    statements = ", ".join(f"{kind} {n / count:.1f}" for kind, n in sorted(stages.statements.items(), key=lambda kv: -kv[1]))
    print(f"  SQL per delivery: {sum(stages.statements.values()) / count:.1f} statements ({statements}),"
          f" {stages.sql_wall * 1000 / count:.3f} ms wall in cursor.execute; {stages.events['checkout'] / count:.1f} pool checkouts"
          f"{' (each pre-pinged: pool_pre_ping)' if out['pre_ping'] else ''}, {stages.events['begin'] / count:.1f} transactions,"
          f" {stages.events['commit'] / count:.1f} commits, {stages.events['rollback'] / count:.1f} rollbacks")
    print("\ncProfile of as many more deliver() calls (profiler overhead included):")
    print(out["cprofile"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500, help="deliveries per peer and round (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the peers' order rotated; 0: only --profile (default 3)")
    parser.add_argument("--concurrency", type=int, default=2, help="each worker's --concurrency (default 2)")
    parser.add_argument("--sequential", type=int, default=50, help="deliveries per peer sent one at a time for latency; 0: none (default 50)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds one round may take (default 300)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then call deliver() N times in this process, stages timed, and N more under cProfile (default 0: no)")
    parser.add_argument("--py-spy", nargs="?", const=shutil.which("py-spy") or "py-spy", default=None, metavar="PATH",
                        help="then sample the gateway worker with py-spy during one more gateway burst (default: py-spy on PATH)")
    args = parser.parse_args()
    if args.py_spy and not shutil.which(args.py_spy):
        parser.error(f"py-spy not found at {args.py_spy!r} (pip install py-spy)")
    if args.py_spy and args.rounds <= 0:
        parser.error("--py-spy needs the worker: --rounds 1 or more")
    if args.rounds <= 0 and not args.profile:
        parser.error("nothing to do: --rounds 0 without --profile")
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    try:
        redis_client(redis_url).ping()
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is the same answer
        print(f"error: no Redis at {redis_url} ({exc}); set REDIS_URL", file=sys.stderr)
        return 1
    prefix = f"bench-{secrets.token_hex(4)}"
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cleanup in finally runs
    tmp = Path(tempfile.mkdtemp(prefix="frontdoor-bench-webhooks-"))
    try:
        digest = code_digest()
        measured = measure(args, tmp, redis_url, prefix)
        measured["code"] = (digest, code_digest())
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
