"""Webhook delivery benchmark: the gateway's worker against a naive ``requests.post`` task, in one run.

Deliveries per second to a local receiver, one Celery worker per side with the same
``--concurrency``, on the same Redis:

- ``gateway``: the gateway's own worker (``celery -A tasks worker -Q webhooks,celery``) running
  ``frontdoor.webhooks.deliver``: claim a batch of due deliveries (one ``UPDATE ... RETURNING``),
  sign and send them at once over kept-alive connections, record their attempts (one update,
  one insert, one commit), again while any are due. The events are recorded and fanned out in
  this process (``app.webhooks.messages.record_message`` + ``fan_out``, no HTTP publishing)
  before the clock starts; the clock starts at the first deliver message
  (``app.webhooks.attempts.wake()``, one per WEBHOOK_BATCH_SIZE deliveries and at most
  ``dispatch.MAX_WAKES``, as beat's dispatch pass sends them for due deliveries);
- ``gateway-fanout``: the same worker, the events recorded here (``record_message``) and each
  handed to ``messages.fan_out_later`` as the API does after its commit (with Redis, no second
  fan-out message while one is queued): the worker's ``fan_out`` task makes the deliveries and
  delivers them;
- ``naive``: bench/naive_webhooks.py, one task per delivery that signs with ``hmac`` and calls
  ``requests.post``; no database at all;
- ``events``: end to end as a user sees it: the gateway's web process (gunicorn, gunicorn.conf.py)
  gets the events one after another on ``POST /_gateway/events`` with a consumer's API key,
  and the same worker delivers them;
- ``naive-events``: bench/naive_events.py under gunicorn with the same settings, a Flask view
  that enqueues one naive task per event, and the naive worker.

The receiver is bench/webhooks.py's ``receiver`` under gunicorn (its own process): it answers
200 at once and keeps each request's arrival time and headers, so that the end of a run (the
K-th arrival), per-delivery latency (enqueue to arrival) and every signature (checked with the
``standardwebhooks`` library after the run) come from one place for all peers.
``--profile N`` adds an in-process breakdown of ``app.webhooks.attempts.deliver`` (claim,
send_batch, record timed per batch, SQL and round trips counted, cProfile); ``--py-spy`` samples
the gateway's worker during one more burst. See bench/README.md.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import cProfile
import http.client
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
# This checkout's app and tasks, not whichever one the virtualenv's editable install points at
# (a git worktree shares the main checkout's .venv); main() gives the children the same path.
sys.path[:0] = [str(BENCH), str(ROOT)]
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

PEERS = ("gateway", "gateway-fanout", "naive", "events", "naive-events")
GATEWAY_PEERS = ("gateway", "gateway-fanout", "events")  # their deliveries are rows in the gateway's tables
WEB_PEERS = ("events", "naive-events")  # events POSTed to a web process, one after another
# The targets: (peer, against, least ratio of deliveries/s).
TARGETS = (("gateway", "naive", 1.5), ("gateway-fanout", "naive", 1.0), ("events", "naive-events", 1.0))
SEQUENTIAL_TARGET = 1.5  # gateway p50 over naive p50, one delivery at a time: at most this
EVENT_TYPE = "bench.event"
RECEIVER_BODY = b'{"ok":true}'
NAIVE_EVENTS_LABEL = "naive-events"  # bench/naive_events.py sends every event to /in/naive-events
WARM_DELIVERIES = 20  # per peer, before anything is measured: boot, imports, pools, first-call paths
SEQUENTIAL_GAP = 0.02  # seconds between sequential deliveries, so the gateway's record of one ends first
IDLE_POLL = 0.02  # seconds between looks at a worker's queue once a run's deliveries arrived
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


def arrived(base: str, label: str) -> int:
    """How many requests the receiver has kept for ``label`` so far."""
    return receiver_get(base, f"/wait?label={label}&count=0&timeout=0")["count"]


def wait_arrivals(base: str, label: str, count: int, deadline: float, procs: list[subprocess.Popen], logs: Path) -> int:
    """Block until the receiver has ``count`` requests for ``label``; raise RuntimeError past
    ``deadline`` (monotonic) or when a worker or web process exits."""
    while True:
        got = receiver_get(base, f"/wait?label={label}&count={count}&timeout=1", timeout=5)["count"]
        if got >= count:
            return got
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"a worker or web process exited with {proc.returncode} ({label}: {got} of {count} arrived)")
        if time.monotonic() > deadline:
            names = ("gateway-worker", "naive-worker", "gateway-web", "naive-web", "gateway-beat")
            raise RuntimeError(f"{label}: {got} of {count} deliveries arrived before the deadline; the processes' output ends:\n"
                               + "".join(tail(logs, name) for name in names))


class Poster:
    """One keep-alive HTTP/1.1 connection for an events peer's POSTs, each waiting for its answer.
    No retry: a POST sent twice would publish an event twice."""

    def __init__(self, base: str):
        parts = urlsplit(base)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            self.conn.request("POST", path, body=body, headers=headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


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
    """CPU seconds so far: the worker's, the web process's (events peers) and the receiver's process
    trees, the Redis server, every postgres process, this process; the machine's busy and total
    jiffies; a monotonic clock."""

    worker: float
    main: float
    web: float
    receiver: float
    redis: float
    postgres: float
    own: float
    busy: float
    total: float
    clock: float

    @classmethod
    def read(cls, peer: Peer, receiver_proc: subprocess.Popen, redis_url: str) -> Counters:
        busy, total = machine_busy()
        return cls(tree_cpu_seconds(peer.worker.pid), process_cpu_seconds(peer.worker.pid),
                   tree_cpu_seconds(peer.web.pid) if peer.web is not None else 0.0, tree_cpu_seconds(receiver_proc.pid),
                   redis_counters(redis_url)[1],
                   postgres_cpu_seconds(), time.process_time(), busy, total, time.monotonic())

    def others(self, before: Counters) -> float:
        """CPUs (on average) used by processes that are none of the above: other work on the machine."""
        ours = sum(getattr(self, name) - getattr(before, name) for name in ("worker", "web", "receiver", "redis", "postgres", "own"))
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


def new_endpoint(label: str, url: str, secret: str, key: bool = False) -> tuple[str, str | None]:
    """A consumer of its own with one endpoint (every event type) at ``url``; return the
    endpoint's id and, with ``key``, an API key of the consumer (no scope: publishing an event
    needs a credential, no scope). A consumer per label: fan-out makes a delivery for every
    enabled endpoint of the consumer."""
    from app.auth import manage
    from app.extensions import db
    from app.models import Consumer
    from app.webhooks import endpoints

    consumer = Consumer(name=f"bench-{label}-{secrets.token_hex(3)}")
    db.session.add(consumer)
    db.session.commit()
    endpoint, _ = endpoints.create(consumer.id, url, f"bench {label}", [], secret, False)
    api_key = manage.create_key(db.session.get(Consumer, consumer.id), []).key if key else None
    return endpoint.id, api_key


def record_events(endpoint_id: str, count: int, fan_out: bool) -> list[tuple[str, str]]:
    """Record ``count`` messages for the endpoint's consumer (and, with ``fan_out``, make their
    deliveries with ``fan_out``: pending and due at once); return ``[(message_id, delivery_id or '')]``."""
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


def hold(endpoint_id: str, due: bool) -> None:
    """Set the endpoint's pending deliveries due now (``due``) or in a day: made before the
    clock (with beat paused), they must not be found by beat's dispatch pass, which wakes a
    worker for what is due, until their run starts."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.extensions import db
    from app.models import WebhookDelivery
    from app.models.base import utcnow

    when = utcnow() + (timedelta(0) if due else timedelta(days=1))
    db.session.execute(update(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id, WebhookDelivery.status == "pending")
                       .values(next_attempt_at=when))
    db.session.commit()


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
    for row in db.session.execute(select(a.delivery_id, a.number, a.created_at, a.duration_ms, a.status_code, a.error).where(a.endpoint_id == endpoint_id)):
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
    """A peer: its worker (shared between the gateway peers, and between the naive ones), its web
    process (events peers), and the Redis keys of the worker's queue and of the messages it holds
    unacknowledged (both empty: the worker has finished everything it was sent)."""

    name: str
    worker: subprocess.Popen
    queue_keys: tuple[str, str]
    web: subprocess.Popen | None = None
    base: str = ""
    runs: list[dict] = field(default_factory=list)
    sequential: dict = field(default_factory=dict)


class Harness:
    """What every run needs: the receiver, the app (gateway peers), the naive task, the secret."""

    def __init__(self, args, app, receiver_base: str, receiver_proc: subprocess.Popen, redis_url: str, secret: str, logs: Path):
        self.args, self.app, self.base, self.receiver_proc = args, app, receiver_base, receiver_proc
        self.redis_url, self.secret, self.logs = redis_url, secret, logs
        self.procs: list[subprocess.Popen] = []  # workers and web processes: one that exits ends the run
        self.labels = 0
        self.posters: dict[str, Poster] = {}
        self.beat: subprocess.Popen | None = None

    def label(self, peer: str, what: str) -> str:
        self.labels += 1
        return f"{peer}-{what}-{self.labels}"

    def prepare(self, peer: Peer, what: str, count: int, fan_out: bool = True) -> dict:
        """What ``send_one`` needs for ``count`` deliveries of ``peer`` to the receiver. For
        ``gateway`` the deliveries are made here (pending and due) unless ``fan_out`` is False;
        call it just before the run, when no worker is busy, since any deliver task would claim them."""
        name = peer.name
        label = NAIVE_EVENTS_LABEL if name == "naive-events" else self.label(name, what)
        work = {"peer": name, "label": label, "url": f"{self.base}/in/{label}"}
        if name == "naive":
            from app.models.base import new_id, utcnow
            from app.webhooks.messages import payload

            # the gateway's own body format, without its tables
            work["items"] = [(new_id("msg"), payload(EVENT_TYPE, utcnow(), event_data(n)).decode()) for n in range(count)]
        elif name in WEB_PEERS:
            work["items"] = [(str(n), json.dumps({"type": EVENT_TYPE, "data": event_data(n)}).encode()) for n in range(count)]
            work["headers"] = {"Content-Type": "application/json"}
            work["path"] = "/events" if name == "naive-events" else "/_gateway/events"
        if name in GATEWAY_PEERS:
            with self.app.app_context():
                work["endpoint_id"], api_key = new_endpoint(label, work["url"], self.secret, key=name == "events")
                if name == "events":
                    work["headers"]["X-API-Key"] = api_key
                elif name == "gateway" and fan_out:
                    with self.beat_paused():  # its dispatch pass would wake a worker for them
                        work["items"] = record_events(work["endpoint_id"], count, fan_out=True)
                        hold(work["endpoint_id"], due=False)
                    work["held"] = True
                elif name == "gateway-fanout" and what == "seq":
                    # One at a time each message is recorded just before it is sent: one recorded
                    # earlier would be waiting, and the first fan-out takes every waiting message.
                    work["items"] = [None] * count
                else:
                    work["items"] = record_events(work["endpoint_id"], count, fan_out=False)
        return work

    @contextlib.contextmanager
    def beat_paused(self) -> Iterator[None]:
        """Beat stopped (SIGSTOP) meanwhile: deliveries made before the clock must not be found
        due by its dispatch pass, which wakes a worker for them."""
        if self.beat is None:
            yield
            return
        os.kill(self.beat.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.beat.pid, signal.SIGCONT)

    def send_one(self, peer: Peer, work: dict, item, index: int | None = None) -> str:
        """Hand one delivery to ``peer``; return the ``webhook-id`` it must arrive with. In a
        gateway burst (``index``, the item's place in it) the deliveries are due already and a
        deliver message goes with every WEBHOOK_BATCH_SIZE-th, at most MAX_WAKES, as beat's
        dispatch pass sends them for due deliveries; one at a time, each gets its own message
        naming it, as a redelivery does."""
        name = peer.name
        if name == "naive":
            import naive_webhooks

            naive_webhooks.deliver.apply_async((work["url"], item[0], item[1]))
            return item[0]
        if name == "gateway":
            from app.webhooks import attempts
            from app.webhooks.dispatch import MAX_WAKES

            batch = self.app.extensions["webhooks"].batch_size
            if index is None:
                woken = attempts.wake([item[1]])
            elif index % batch == 0 and index // batch < MAX_WAKES:
                woken = attempts.wake()
            else:
                return item[0]
            if not woken:
                raise RuntimeError(f"could not send the deliver message of {item[1]}")
            return item[0]
        if name == "gateway-fanout":
            from app.webhooks import messages

            messages.fan_out_later([item[0]])  # as the API does after each event's commit
            return item[0]
        status, body = self.posters[name].post(work["path"], item[1], work["headers"])
        if status != 202:
            raise RuntimeError(f"{name}: POST {work['path']} answered {status}: {body[:300]!r}")
        return json.loads(body)["id"]

    def wait_idle(self, peer: Peer, deadline: float) -> float:
        """Wait until the peer's worker has finished every message it was sent (its queue and
        its unacknowledged messages both empty, twice in a row); return that time (epoch s).
        A gateway burst sends several deliver messages while one task drains the deliveries:
        the others still run (finding nothing due) after the last delivery arrived."""
        client, (queue_key, unacked_key), empty = redis_client(self.redis_url), peer.queue_keys, 0
        while empty < 2:
            if client.llen(queue_key) == 0 and client.hlen(unacked_key) == 0:
                empty += 1
            else:
                empty = 0
            if time.monotonic() > deadline:
                raise RuntimeError(f"{peer.name}: the worker still had messages at the deadline ({queue_key} {client.llen(queue_key)},"
                                   f" {unacked_key} {client.hlen(unacked_key)})")
            time.sleep(IDLE_POLL)
        return time.time() - IDLE_POLL

    def burst(self, peer: Peer, work: dict) -> dict:
        """Send every delivery of ``work`` (all at once; events peers: one POST after another,
        each waiting for its 202), wait for the K-th arrival (gateway peers: and for every row to
        be final) and for the worker to be idle again. Returns the run's figures."""
        count = len(work["items"])
        offset = arrived(self.base, work["label"])
        if peer.name in self.posters:
            self.posters[peer.name].close()  # a fresh keep-alive connection per run
        if work.get("held"):
            with self.app.app_context():
                hold(work["endpoint_id"], due=True)
        before = Counters.read(peer, self.receiver_proc, self.redis_url)
        enqueued: dict[str, float] = {}
        with self.app.app_context():
            first = time.time()
            for index, item in enumerate(work["items"]):
                sent = time.time()
                enqueued[self.send_one(peer, work, item, index)] = sent
            enqueue_seconds = time.time() - first
            deadline = time.monotonic() + self.args.deadline
            wait_arrivals(self.base, work["label"], offset + count, deadline, self.procs, self.logs)
            at_arrival = Counters.read(peer, self.receiver_proc, self.redis_url)
            rows, attempts = wait_final(work["endpoint_id"], count, deadline) if peer.name in GATEWAY_PEERS else ([], {})
            idle_at = self.wait_idle(peer, deadline)
            after = Counters.read(peer, self.receiver_proc, self.redis_url)
        records = receiver_get(self.base, f"/records?label={work['label']}")[offset:]
        arrivals = sorted(r[0] for r in records)
        last_arrival = arrivals[-1]
        run = {
            "early": offset if work["label"] != NAIVE_EVENTS_LABEL else 0,  # arrived before the clock started
            # the longest pause between two arrivals (or before the first): a due delivery that
            # no running task claimed waits for beat's next dispatch pass
            "gap_ms": max(b - a for a, b in zip([first, *arrivals], arrivals, strict=False)) * 1000,
            "count": count,
            "enqueue_s": enqueue_seconds,
            "arrival_rate": count / (last_arrival - first),
            "idle_rate": count / (idle_at - first),
            "latency": [r[0] - enqueued[r[1]] for r in records if r[1] in enqueued],
            **self.check(records, enqueued),
            # CPU until the worker is idle again: all the work the run caused
            "worker_cpu": (after.worker - before.worker) * 1000 / count,
            "worker_cpu_at_arrival": (at_arrival.worker - before.worker) * 1000 / count,
            "main_cpu": (after.main - before.main) * 1000 / count,
            "web_cpu": (after.web - before.web) * 1000 / count,
            "receiver_cpu": (after.receiver - before.receiver) * 1000 / count,
            "redis_cpu": (after.redis - before.redis) * 1000 / count,
            "postgres_cpu": (after.postgres - before.postgres) * 1000 / count,
            "busy": (after.busy - before.busy) / max(after.total - before.total, 1),
            "others": after.others(before),
        }
        run["rate"] = run["arrival_rate"]  # as the receiver sees it: first send to the K-th arrival
        if rows:
            if peer.name != "events":  # the brief's end for the worker-only peers: the last row succeeded
                run["rate"] = count / (max(row.finished_at for row in rows).timestamp() - first)
            run.update(self.check_rows(rows, enqueued, attempts))
            firsts = [min(attempts[row.id], key=lambda a: a.created_at) for row in rows if attempts[row.id]]
            run["http_ms"] = [a.duration_ms for a in firsts]
            # claim -> record: the claim's clock reading (last_attempt_at) to the attempt row's
            run["service_ms"] = [
                (attempts[row.id][-1].created_at - row.last_attempt_at).total_seconds() * 1000
                for row in rows if attempts[row.id] and row.last_attempt_at is not None
            ]
        return run

    def one_at_a_time(self, peer: Peer, work: dict) -> dict:
        """Deliveries sent one after another: send, wait for its arrival, pause, next. For
        ``gateway`` each delivery is made (``fan_out``, here) just before the clock starts:
        made all at once, the first deliver task would claim them all; for ``gateway-fanout``
        each message is recorded just before, for the same reason."""
        from app.webhooks import messages

        enqueued: dict[str, float] = {}
        offset = arrived(self.base, work["label"])
        with self.app.app_context():
            for index, item in enumerate(work["items"], 1):
                if peer.name == "gateway":
                    item = (item[0], messages.fan_out(item[0])[0])
                elif peer.name == "gateway-fanout":
                    item = record_events(work["endpoint_id"], 1, fan_out=False)[0]
                sent = time.time()
                enqueued[self.send_one(peer, work, item)] = sent
                wait_arrivals(self.base, work["label"], offset + index, time.monotonic() + 30, self.procs, self.logs)
                time.sleep(SEQUENTIAL_GAP)
            deadline = time.monotonic() + 30
            rows, attempts = wait_final(work["endpoint_id"], len(work["items"]), deadline) if peer.name in GATEWAY_PEERS else ([], {})
            self.wait_idle(peer, deadline)
        records = receiver_get(self.base, f"/records?label={work['label']}")[offset:]
        result = {"latency": [r[0] - enqueued[r[1]] for r in records if r[1] in enqueued], **self.check(records, enqueued)}
        if rows:
            result["recorded"] = [row.finished_at.timestamp() - enqueued[row.message_id] for row in rows if row.message_id in enqueued]
            result.update(self.check_rows(rows, enqueued, attempts))
        return result

    def check(self, records: list, enqueued: dict[str, float]) -> dict:
        """Exactly the expected ids, once each, every signature good."""
        ids = [r[1] for r in records]
        return {
            "duplicates": len(ids) - len(set(ids)),
            "unknown": sum(1 for ident in ids if ident not in enqueued),
            "missing": len(set(enqueued) - set(ids)),
            "bad_signatures": self.verify(records),
        }

    @staticmethod
    def check_rows(rows: list, enqueued: dict[str, float], attempts: dict) -> dict:
        """Every row succeeded on its first attempt; the failed attempts' outcomes, to print."""
        failed = [f"{row.id} attempt {a.number} at {a.created_at:%H:%M:%S.%f}: status {a.status_code}, {a.duration_ms} ms, {a.error}"
                  for row in rows for a in sorted(attempts[row.id], key=lambda a: a.number) if a.status_code != 200]
        return {
            "not_succeeded": sum(1 for row in rows if row.status != "succeeded"),
            "retried": sum(1 for row in rows if row.attempts > 1),
            "rows_unknown": sum(1 for row in rows if row.message_id not in enqueued),
            "failed_attempts": failed,
        }

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
# The in-process profile of app.webhooks.attempts.deliver


class Stages:
    """Wall and CPU time per wrapped function (module attributes replaced for the profile's
    duration, so that ``deliver`` calls the wrappers; CPU is the calling thread's, so a batch's
    attempts on their sending threads are counted in ``attempt``, not in ``send_batch``), the
    claims' sizes, and what goes to the database while ``active``: statements (by kind, and by
    the innermost wrapped function they run in), pool checkouts (each with its pre-ping),
    transactions begun, commits and rollbacks."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.statements: dict[str, int] = defaultdict(int)
        self.sql_wall = 0.0
        self.by_stage: dict[str, int] = defaultdict(int)
        self.events: dict[str, int] = defaultdict(int)
        self.claimed: list[int] = []  # deliveries per claim, empty ones included
        self.local = threading.local()  # each thread's stack of wrapped calls
        self.patched: list[tuple[object, str, object]] = []
        self.labels: list[tuple[str, int]] = []  # (label, depth) in the report's order
        self.active = False
        self.lock = threading.Lock()
        self.total_wall = self.total_cpu = 0.0
        self.delivered = 0
        self.outcomes: dict[str, int] = defaultdict(int)

    def stack(self) -> list[str]:
        if not hasattr(self.local, "stack"):
            self.local.stack = []
        return self.local.stack

    def wrap(self, owner, name: str, label: str, depth: int) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            stack = self.stack()
            stack.append(label)
            try:
                result = original(*args, **kwargs)
                if name == "claim" and self.active:
                    self.claimed.append(len(result))
                return result
            finally:
                stack.pop()
                if self.active:
                    with self.lock:
                        self.wall[label] += time.perf_counter() - wall
                        self.cpu[label] += time.thread_time() - cpu
                        self.calls[label] += 1

        self.patched.append((owner, name, original))
        self.labels.append((label, depth))
        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self.patched):
            setattr(owner, name, original)
        self.patched.clear()

    def listen(self, engine) -> Callable[[], None]:
        """Count what goes to the database while ``active``, at the driver (psycopg), so that
        statements run through SQLAlchemy and those run on psycopg's cursor directly (the
        claim's and the record's) count alike: statements (``Cursor.execute``), BEGIN, COMMIT
        and ROLLBACK (the commands psycopg sends itself), pool checkouts (SQLAlchemy's event)
        and the tests of idle connections at checkout. Returns the undo."""
        import psycopg
        from sqlalchemy import event

        execute, executemany = psycopg.Cursor.execute, psycopg.Cursor.executemany
        command = psycopg.Connection._exec_command  # BEGIN, COMMIT, ROLLBACK (psycopg 3)

        def counted(run):
            def counted_run(cursor, query, *args, **kwargs):
                if not self.active:
                    return run(cursor, query, *args, **kwargs)
                text = query.decode() if isinstance(query, bytes) else str(query)
                self.statements[text.lstrip().split(None, 1)[0].upper()] += 1
                stack = self.stack()
                self.by_stage[stack[-1] if stack else "-"] += 1
                started = time.perf_counter()
                try:
                    return run(cursor, query, *args, **kwargs)
                finally:
                    self.sql_wall += time.perf_counter() - started
            return counted_run

        def counted_command(connection, sent, *args, **kwargs):
            if self.active:
                word = (sent.decode() if isinstance(sent, bytes) else str(sent)).split(None, 1)[0].lower()
                if word in ("begin", "commit", "rollback"):
                    self.events[word] += 1
            return command(connection, sent, *args, **kwargs)

        def checkout(*_):
            if self.active:
                self.events["checkout"] += 1

        psycopg.Cursor.execute, psycopg.Cursor.executemany = counted(execute), counted(executemany)
        psycopg.Connection._exec_command = counted_command
        event.listen(engine, "checkout", checkout)
        ping = engine.dialect.do_ping  # the checkout's test of an idle connection (app.extensions.ping_when_idle)

        def counted_ping(dbapi_connection):
            if self.active:
                self.events["ping"] += 1
            return ping(dbapi_connection)

        engine.dialect.do_ping = counted_ping

        def undo() -> None:
            psycopg.Cursor.execute, psycopg.Cursor.executemany = execute, executemany
            psycopg.Connection._exec_command = command
            event.remove(engine, "checkout", checkout)
            del engine.dialect.do_ping
        return undo

    @contextlib.contextmanager
    def measured(self) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        self.active = True
        try:
            yield
        finally:
            self.active = False
            self.total_wall += time.perf_counter() - wall
            self.total_cpu += time.process_time() - cpu

    def summary(self) -> dict:
        """Per delivery: statements, transactions, commits, rollbacks, round trips (statements +
        BEGIN + COMMIT + ROLLBACK + the tests of idle connections at checkout, as psycopg sends them)."""
        n = max(self.delivered, 1)
        statements = sum(self.statements.values())
        trips = statements + self.events["begin"] + self.events["commit"] + self.events["rollback"] + self.events["ping"]
        return {"statements": statements / n, "transactions": self.events["begin"] / n, "commits": self.events["commit"] / n,
                "rollbacks": self.events["rollback"] / n, "checkouts": self.events["checkout"] / n, "pings": self.events["ping"] / n, "round_trips": trips / n,
                "batches": sum(1 for size in self.claimed if size), "claims": len(self.claimed)}


PROFILE_SHAPES = {
    "backlog": "N deliveries due at once, one deliver() call (in one app context) claiming them batch by batch, as a"
               " worker's deliver task drains a burst",
    "one-at-a-time": "each delivery made just before, then deliver([its id]) in an app context of its own, as a fan_out task"
                     " delivers what it made when nothing else is due (its second claim finds nothing)",
}


def profile(args, app, receiver_base: str, secret: str) -> dict:
    """Call ``deliver`` in this process, stages timed, in the two shapes of PROFILE_SHAPES
    (``--profile`` deliveries each), then the backlog shape once more under cProfile, then the
    naive task's function as many times; return what was measured."""
    import naive_webhooks

    from app.extensions import db
    from app.webhooks import attempts, endpoints, messages
    from app.webhooks import secrets as webhook_secrets
    from app.webhooks.settings import settings

    count = args.profile
    forever = 24 * 3600.0  # no hand-over message (wake) while draining: no worker is running now
    out: dict = {"count": count, "shapes": {}}
    with app.app_context():
        config = settings()
        endpoint_id, _ = new_endpoint("profile", f"{receiver_base}/in/profile", secret)
        items = [message_id for message_id, _ in record_events(endpoint_id, WARM_DELIVERIES + 3 * count, fan_out=False)]
        out["batch_size"], out["endpoint_concurrency"] = config.batch_size, config.endpoint_concurrency
        guard, engine = config.guard, db.engine
    out["pre_ping"] = float(app.config["DATABASE_PING_AFTER"])

    def make(message_ids: list[str]) -> list[str]:
        with app.app_context():
            return [delivery_id for message_id in message_ids for delivery_id in messages.fan_out(message_id)]

    def drain() -> dict[str, int]:
        with app.app_context():
            return attempts.deliver(None, drain=forever)

    make(items[:WARM_DELIVERIES])
    drain()
    for shape, chunk in (("backlog", items[WARM_DELIVERIES:WARM_DELIVERIES + count]),
                         ("one-at-a-time", items[WARM_DELIVERIES + count:WARM_DELIVERIES + 2 * count])):
        stages = Stages()
        for owner, name, label, depth in (
            (attempts, "deliver", "deliver", 0),
            (attempts, "claim", "claim", 1),
            (messages, "payload", "messages.payload (JSON body)", 2),
            (attempts, "send_batch", "send_batch (its own thread)", 1),
            (endpoints, "signing_secrets", "signing_secrets (Fernet decrypt, once per endpoint)", 2),
            (attempts, "attempt", "attempt (a sending thread each; inline for one)", 1),
            (guard, "check", "guard.check (resolve + check)", 2),
            (webhook_secrets, "sign", "secrets.sign (standardwebhooks)", 2),
            (attempts, "send", "sender.send (HTTP POST)", 2),
            (attempts, "record", "record", 1),
            (attempts, "_track_health", "_track_health", 2),
            (attempts, "wake", "wake", 1),
        ):
            stages.wrap(owner, name, label, depth)
        undo = stages.listen(engine)
        try:
            if shape == "backlog":
                make(chunk)
                with stages.measured():
                    done = drain()
                for status, n in done.items():
                    stages.outcomes[status] += n
            else:
                for message_id in chunk:
                    made = make([message_id])
                    with stages.measured(), app.app_context():
                        done = attempts.deliver(made, drain=forever)
                    for status, n in done.items():
                        stages.outcomes[status] += n
        finally:
            undo()
            stages.restore()
        stages.delivered = sum(stages.claimed)
        out["shapes"][shape] = {"stages": stages, **stages.summary()}

    make(items[WARM_DELIVERIES + 2 * count:])
    profiler = cProfile.Profile()
    profiler.enable()
    drain()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(r"app/|requests/(api|sessions)|urllib3/connectionpool|sqlalchemy/orm/session|standardwebhooks|fernet|json/", 40)
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

# Inclusive shares: a sample counts for a row when a frame of its stack matches (``name (file``);
# an indented row only below a match of the row above it. A batch's attempts run on sending
# threads of their own, whose stacks start at ``attempt``, not under ``deliver``.
SPY_STAGES = (
    ("fan_out (the delivery rows)", r"^fan_out \(.*app/webhooks/messages\.py"),
    ("deliver", r"^deliver \(.*app/webhooks/attempts\.py"),
    ("  claim", r"^claim \(.*app/webhooks/attempts\.py"),
    ("  send_batch (the task's thread)", r"^send_batch \(.*app/webhooks/attempts\.py"),
    ("  record", r"^record \(.*app/webhooks/attempts\.py"),
    ("    _track_health", r"^_track_health \(.*app/webhooks/attempts\.py"),
    ("    the attempts' log lines", r"^Logger\.info \(logging/"),
    ("  wake", r"^wake \(.*app/webhooks/attempts\.py"),
    ("attempt (sending threads, or inline)", r"^attempt \(.*app/webhooks/attempts\.py"),
    ("  sender.send (HTTP)", r"^send \(.*app/webhooks/sender\.py"),
)
# Where a sample is in the webhook code at all: the rows above without an indentation.
SPY_ROOT = r"^(fan_out|deliver|attempt) \(.*app/webhooks/(messages|attempts)\.py"
# Across the webhook code: where its samples end up, by library.
SPY_LAYERS = (
    ("COMMIT (the driver's commit)", r"(^|\.)do_commit \(sqlalchemy/engine"),
    ("statements in the driver (cursor.execute)", r"(^|\.)do_execute(many)? \(sqlalchemy/engine"),
    ("SQLAlchemy, the rest (ORM, compile, results)", r"\(sqlalchemy/"),
    ("urllib3 + http.client (the POST)", r"\((requests|urllib3)/|\(http/client\.py"),
    ("threading (the sending threads' hand-over)", r"\((threading|concurrent/futures/.*)\.py"),
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
    """Shares of py-spy's raw (collapsed) samples: by process, by stage of the webhook code
    (inclusive), by library across it, and the functions with the most own samples."""
    import re

    stages = [(label, re.compile(pattern)) for label, pattern in SPY_STAGES]
    layers = [(label, re.compile(pattern)) for label, pattern in SPY_LAYERS]
    root = re.compile(SPY_ROOT)
    inside = 0
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
        if any(root.search(frame) for frame in code):
            inside += samples
            inner = code[next(i for i, frame in enumerate(code) if root.search(frame)):]
            for label, pattern in layers:  # first match from the leaf up, so each sample counts once
                if any(pattern.search(frame) for frame in inner):
                    layer_counts[label] += samples
                    break
            else:
                layer_counts["the gateway's own code and the rest"] += samples
        if code:
            leaves[code[-1]] += samples
    return {"total": total, "main": main, "inside": inside, "stages": dict(counts), "layers": dict(layer_counts),
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
            ports = {name: free_port() for name in ("receiver", "gateway-web", "naive-web")}
            receiver_base = f"http://127.0.0.1:{ports['receiver']}"
            procs.append(start("receiver", [
                gunicorn, "--bind", f"127.0.0.1:{ports['receiver']}", "--workers", "1", "--worker-class", "gthread",
                "--threads", "8", "--log-level", "warning", "--no-control-socket", "--chdir", str(BENCH), "webhooks:receiver",
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
            cap = args.endpoint_concurrency or max(app.extensions["webhooks"].endpoint_concurrency, args.concurrency)
            if cap != app.extensions["webhooks"].endpoint_concurrency:
                # The per-endpoint cap would hold the worker's extra processes back: raise it to N.
                gateway_env["GATEWAY_WEBHOOK_ENDPOINT_CONCURRENCY"] = str(cap)
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
                naive_worker = procs[-1]
                # Beat, as the Procfile runs it: its dispatch pass (every WEBHOOK_DISPATCH_INTERVAL) wakes a
                # worker for due deliveries that no running task claimed.
                procs.append(start("gateway-beat", [
                    celery, "-A", "tasks", "beat", "--loglevel", "INFO", "--schedule", str(tmp / "beat-schedule"),
                ], child_env(**gateway_env), ROOT, tmp))
                beat = procs[-1]
                # The web peers: the gateway as the Procfile runs it, and the naive view under the same settings.
                web_concurrency, web_threads = os.environ.get("WEB_CONCURRENCY", "2"), os.environ.get("WEB_THREADS", "8")
                procs.append(start("gateway-web", [gunicorn, "--config", "gunicorn.conf.py", "app:create_app()"], child_env(
                    **gateway_env, HOST="127.0.0.1", PORT=str(ports["gateway-web"]), WEB_CONCURRENCY=web_concurrency,
                    WEB_THREADS=web_threads,
                ), ROOT, tmp))
                gateway_web = procs[-1]
                procs.append(start("naive-web", [
                    gunicorn, "--bind", f"127.0.0.1:{ports['naive-web']}", "--workers", web_concurrency, "--worker-class", "gthread",
                    "--threads", web_threads, "--keep-alive", "75", "--reuse-port", "--log-level", "warning", "--no-control-socket",
                    "--chdir", str(BENCH), "naive_events:app",
                ], child_env(**naive_env, NAIVE_EVENTS_URL=f"{receiver_base}/in/{NAIVE_EVENTS_LABEL}"), BENCH, tmp))
                naive_web = procs[-1]
                harness.procs = [gateway_worker, naive_worker, gateway_web, naive_web, beat]
                harness.beat = beat
                gateway_keys = (f"{prefix}:celery:webhooks", f"{prefix}:celery:unacked")
                naive_keys = (f"{prefix}:naive:celery", f"{prefix}:naive:unacked")
                peers = {
                    "gateway": Peer("gateway", gateway_worker, gateway_keys),
                    "gateway-fanout": Peer("gateway-fanout", gateway_worker, gateway_keys),
                    "naive": Peer("naive", naive_worker, naive_keys),
                    "events": Peer("events", gateway_worker, gateway_keys, gateway_web, f"http://127.0.0.1:{ports['gateway-web']}"),
                    "naive-events": Peer("naive-events", naive_worker, naive_keys, naive_web, f"http://127.0.0.1:{ports['naive-web']}"),
                }
                for name in WEB_PEERS:
                    wait_ready("gateway-web" if name == "events" else "naive-web", peers[name].base, "/healthz", peers[name].web, tmp)
                    harness.posters[name] = Poster(peers[name].base)
                for name in args.peers:  # the first ones wait for the workers to boot
                    try:
                        harness.burst(peers[name], harness.prepare(peers[name], "warm", WARM_DELIVERIES))
                    except RuntimeError as exc:
                        raise RuntimeError(f"{name} warm-up: {exc}") from None
                print(f"{args.events} events per peer and round, {args.rounds} rounds, the peers' order rotated;"
                      f" one worker per side, --concurrency {args.concurrency} (prefork); WEBHOOK_ENDPOINT_CONCURRENCY {cap},"
                      f" WEBHOOK_BATCH_SIZE {app.extensions['webhooks'].batch_size}", flush=True)
                for index in range(args.rounds):
                    order = args.peers[index % len(args.peers):] + args.peers[:index % len(args.peers)]
                    for name in order:  # each peer's work made just before its run, the workers idle
                        run = harness.burst(peers[name], harness.prepare(peers[name], f"r{index + 1}", args.events))
                        peers[name].runs.append(run)
                        print(f"  round {index + 1}  {name:<15}{run['rate']:>8.1f} deliveries/s  enqueue-to-arrival p50"
                              f" {percentile(run['latency'], 50) * 1000:8.1f} ms  worker CPU {run['worker_cpu']:.2f} ms/delivery"
                              f"  web {run['web_cpu']:.2f}  machine busy {run['busy'] * 100:.0f}%, other processes {run['others']:.2f} CPUs",
                              flush=True)
                if args.sequential:
                    for name in args.peers:
                        work = harness.prepare(peers[name], "seq", args.sequential, fan_out=False)
                        peers[name].sequential = harness.one_at_a_time(peers[name], work)
                spied_peer = next((name for name in args.peers if name in GATEWAY_PEERS), None)
                if args.py_spy and spied_peer:
                    work = harness.prepare(peers[spied_peer], "py-spy", args.events)
                    out = tmp / "py-spy.txt"
                    spy = spy_start(args.py_spy, gateway_worker.pid, out, tmp)
                    time.sleep(1.0)  # py-spy attaches to the worker and its pool processes
                    run = harness.burst(peers[spied_peer], work)
                    spy_stop(spy)
                    if not out.exists():
                        raise RuntimeError(f"py-spy wrote nothing; its output ends:\n{tail(tmp, 'py-spy')}")
                    spied = {"run": run, "peer": spied_peer, **spy_summary(out)}
                for poster in harness.posters.values():
                    poster.close()
                for proc in harness.procs:
                    stop(proc)
            profiled = profile(args, app, receiver_base, secret) if args.profile else None
        finally:
            for proc in reversed(procs):
                stop(proc)
            delete_keys(redis_url, prefix)
    return {"peers": peers, "database": db_name, "profile": profiled, "spy": spied, "cap": cap,
            "batch_size": app.extensions["webhooks"].batch_size}


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


def verdict(value: float, target: float, at_least: bool = True) -> str:
    return "PASS" if (value >= target if at_least else value <= target) else "MISS"


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
        print(f"one Celery worker per side, --concurrency {args.concurrency} (prefork), Redis broker, late acks, prefetch 1;"
              f" WEBHOOK_ENDPOINT_CONCURRENCY {measured['cap']} (one endpoint per run), WEBHOOK_BATCH_SIZE {measured['batch_size']}")
        print("  gateway: events recorded and fanned out in this process (record_message + fan_out, no HTTP publishing) before"
              " the clock;\n    clock from the first deliver message (attempts.wake(), one per WEBHOOK_BATCH_SIZE due deliveries, at most 8, as beat's dispatch) to the"
              " last delivery row's finished_at (succeeded); attempt logging on")
        print("  gateway-fanout: events recorded here (record_message), each handed to messages.fan_out_later as the API does"
              " (with Redis, no second fan-out message while one is queued): the worker's fan_out task makes the deliveries and"
              " delivers them; clock from the first fan_out_later to the last row's finished_at")
        print("  naive: bench/naive_webhooks.py, hmac + requests.post per task, no database; clock to the receiver's K-th arrival")
        print("  events: POST /_gateway/events to the gateway's web process (gunicorn.conf.py, WEB_CONCURRENCY x WEB_THREADS)"
              " with a consumer's API key, one after another, each waiting for its 202;\n    the same worker; clock from the"
              " first POST to the receiver's K-th arrival")
        print("  naive-events: the same POSTs to bench/naive_events.py (a Flask view that enqueues one naive task per event,"
              " same gunicorn settings), the naive worker; the same clock")
        print(f"\n  {'peer':<15}{'deliv/s':>8}{'rounds':>16}{'idle/s':>8}{'burst p50':>11}{'p99':>8}{'worker CPU':>11}"
              f"{'@arrival':>9}{'main':>6}{'web':>6}{'receiver':>9}{'Redis':>6}{'Postgres':>9}{'busy':>6}{'others':>7}{'max gap':>9}")
        table = {}
        postgres_db = measured["database"].startswith("PostgreSQL")
        for name in args.peers:
            runs = peers[name].runs
            row = table[name] = {
                "rate": statistics.median(r["rate"] for r in runs),
                "p50": statistics.median(ms(r["latency"], 50) for r in runs),
                "p99": statistics.median(ms(r["latency"], 99) for r in runs),
            }
            for key in ("idle_rate", "worker_cpu", "worker_cpu_at_arrival", "main_cpu", "web_cpu", "receiver_cpu", "redis_cpu",
                        "postgres_cpu", "busy", "others"):
                row[key] = statistics.median(r[key] for r in runs)
            rounds = " ".join(f"{r['rate']:.0f}" for r in runs)
            postgres = f"{row['postgres_cpu']:>9.2f}" if postgres_db else f"{'-':>9}"
            web = f"{row['web_cpu']:>6.2f}" if name in WEB_PEERS else f"{'-':>6}"
            print(f"  {name:<15}{row['rate']:>8.1f}{rounds:>16}{row['idle_rate']:>8.1f}{row['p50']:>9.0f}ms{row['p99']:>6.0f}ms"
                  f"{row['worker_cpu']:>11.2f}{row['worker_cpu_at_arrival']:>9.2f}{row['main_cpu']:>6.2f}{web}"
                  f"{row['receiver_cpu']:>9.2f}{row['redis_cpu']:>6.2f}{postgres}{row['busy'] * 100:>5.0f}%{row['others']:>7.2f}"
                  f"{max(r['gap_ms'] for r in runs):>7.0f}ms")
        print("  idle/s: the same K over first send to the worker's queue empty again (every message it was sent finished);"
              " burst p50/p99: send to arrival at the receiver (all K sent at once, or one POST after another: mostly queueing);"
              "\n  CPU columns, ms per delivery: the worker's process tree until it was idle again (@arrival: until the K-th"
              " arrival), its main process alone (the consumer), the web process tree, the receiver's, the Redis server's and"
              " every postgres process's (other clients included);\n  busy: all CPUs over the run, from /proc/stat; others:"
              " CPUs used meanwhile by processes outside the run; max gap: the longest pause between two arrivals"
              " (or before the first) in any round")
        print("\ntargets (the issue's):")
        for name, against, target in TARGETS:
            if name not in table or against not in table:
                continue
            ratio = table[name]["rate"] / table[against]["rate"]
            print(f"  {name}/{against} deliveries/s: {ratio:5.2f}  (target >= {target:.1f})  {verdict(ratio, target)}"
                  f"   [{table[name]['rate']:.1f} against {table[against]['rate']:.1f}; worker CPU per delivery"
                  f" x{table[name]['worker_cpu'] / table[against]['worker_cpu']:.2f} of {against}'s,"
                  f" worker + web x{(table[name]['worker_cpu'] + table[name]['web_cpu']) / (table[against]['worker_cpu'] + table[against]['web_cpu']):.2f}]")
        if args.sequential and {"gateway", "naive"} <= set(args.peers):
            gw, naive = ms(peers["gateway"].sequential["latency"], 50), ms(peers["naive"].sequential["latency"], 50)
            print(f"  one at a time, gateway p50 / naive p50: {gw / naive:5.2f}  (target <= {SEQUENTIAL_TARGET:.1f})"
                  f"  {verdict(gw / naive, SEQUENTIAL_TARGET, at_least=False)}   [{gw:.2f} ms against {naive:.2f} ms]")
        gw = [r for name in GATEWAY_PEERS if name in args.peers for r in peers[name].runs]
        if gw:
            print(f"\n  gateway rows (all three gateway peers): claim-to-record p50 {statistics.median(ms(r['service_ms'], 50, 1) for r in gw):.2f} ms"
                  f" (last_attempt_at to the attempt's created_at), HTTP p50 {statistics.median(ms(r['http_ms'], 50, 1) for r in gw):.0f} ms"
                  " (duration_ms, whole ms)" + (f"; gateway's deliveries/s to the K-th arrival"
                  f" {statistics.median(r['arrival_rate'] for r in peers['gateway'].runs):.1f}" if "gateway" in args.peers else ""))
        print("  sending K took (ms, median): " + ", ".join(
            f"{name} {statistics.median(r['enqueue_s'] for r in peers[name].runs) * 1000:.0f}" for name in args.peers))
        if args.sequential:
            print(f"\none at a time ({args.sequential} per peer, {SEQUENTIAL_GAP * 1000:g} ms apart), send to arrival at the receiver"
                  " (gateway: each delivery made just before; events peers: POST to arrival):")
            for name in args.peers:
                seq = peers[name].sequential
                extra = (f"   send to row finished_at p50 {ms(seq['recorded'], 50):.2f} ms" if "recorded" in seq else "")
                print(f"  {name:<16}p50 {ms(seq['latency'], 50):6.2f} ms  p99 {ms(seq['latency'], 99):6.2f} ms{extra}")
        problems = []
        for name in args.peers:
            runs = peers[name].runs + ([peers[name].sequential] if peers[name].sequential else [])
            for key, what in (("duplicates", "webhook-ids seen twice"), ("unknown", "unexpected requests"),
                              ("missing", "expected webhook-ids that never arrived"),
                              ("bad_signatures", "signatures a Standard Webhooks verifier rejected"),
                              ("not_succeeded", "deliveries not succeeded"), ("retried", "deliveries retried"),
                              ("rows_unknown", "delivery rows of messages not sent"),
                              ("early", "deliveries that arrived before their run started (not in its figures)")):
                total = sum(r.get(key, 0) for r in runs)
                if total:
                    problems.append(f"{name}: {total} {what}")
        for problem in problems:
            print(f"WARNING: {problem}")
        for name in GATEWAY_PEERS:
            if name not in args.peers:
                continue
            for run in peers[name].runs + ([peers[name].sequential] if peers[name].sequential else []):
                for line in run.get("failed_attempts", []):
                    print(f"  {name}: failed attempt {line}")
        if not problems:
            print("  every expected webhook-id arrived exactly once, and no other, with a signature standardwebhooks verifies;"
                  " every gateway row succeeded on its first attempt")
    if measured["spy"]:
        report_spy(measured["spy"])
    if measured["profile"]:
        report_profile(measured["profile"])


def report_spy(spied: dict) -> None:
    run, total = spied["run"], max(spied["total"], 1)
    per = 1000 / SPY_RATE / run["count"]  # ms per delivery that one sample stands for
    print(f"\npy-spy on the gateway worker (main + pool processes), one more {spied['peer']} burst of {run['count']}"
          f" ({run['rate']:.1f} deliveries/s, {run['worker_cpu']:.2f} ms worker CPU per delivery, not in the rates above);"
          f" {spied['total']} samples at {SPY_RATE} Hz;")
    print("py-spy's default (no --idle) leaves out a thread waiting for work, not one waiting for the CPU or the disk:"
          " ms/delivery is sampled time (samples / rate / deliveries), wall time summed over the processes and threads")
    print(f"  {'where':<50}{'share':>7}{'ms/delivery':>13}")

    def row(label: str, samples: int) -> None:
        print(f"  {label:<50}{samples * 100 / total:>6.1f}%{samples * per:>13.2f}")

    row("Celery main process (consumer, acks, pool pipes)", spied["main"])
    pool = total - spied["main"]
    row("pool processes", pool)
    row("  outside the webhook code (Celery's trace, app context)", pool - spied["inside"])
    for label, _ in SPY_STAGES:
        row(f"  {label}", spied["stages"].get(label, 0))
    print("  the webhook code's samples by where they end (first match from the leaf up):")
    for label, samples in sorted(spied["layers"].items(), key=lambda kv: -kv[1]):
        row(f"    {label}", samples)
    print("  functions with the most own samples:")
    for frame, samples in spied["leaves"]:
        row(f"    {frame[:46]}", samples)


def report_profile(out: dict) -> None:
    count = out["count"]
    print(f"\nin one process, app.webhooks.attempts.deliver (after {WARM_DELIVERIES} deliveries unmeasured),"
          f" WEBHOOK_BATCH_SIZE {out['batch_size']}, WEBHOOK_ENDPOINT_CONCURRENCY {out['endpoint_concurrency']}, one endpoint;"
          f" the naive task's function called directly {count} times: {out['naive_wall'] * 1000 / count:.2f} ms wall,"
          f" {out['naive_cpu'] * 1000 / count:.2f} ms CPU per delivery")
    for shape, found in out["shapes"].items():
        stages: Stages = found["stages"]
        n = max(stages.delivered, 1)
        batches = max(found["batches"], 1)
        print(f"\n  {shape}: {PROFILE_SHAPES[shape]}")
        print(f"  {stages.delivered} deliveries in {found['batches']} batches ({stages.delivered / batches:.1f} per batch;"
              f" {found['claims']} claims, empty ones included), outcomes {dict(stages.outcomes)};"
              f" per delivery {stages.total_wall * 1000 / n:.2f} ms wall, {stages.total_cpu * 1000 / n:.2f} ms CPU (process)")
        print(f"  {'stage':<52}{'calls':>7}{'wall ms':>9}{'CPU ms':>8}{'SQL':>6}{'per batch: CPU ms':>19}{'SQL':>6}"
              "   (per delivery unless said; SQL: statements run in it, not in a stage below)")
        for label, depth in stages.labels:
            indent = "  " * (depth + 1)
            print(f"  {indent}{label:<{52 - len(indent)}}{stages.calls[label] / n:>7.2f}{stages.wall[label] * 1000 / n:>9.3f}"
                  f"{stages.cpu[label] * 1000 / n:>8.3f}{stages.by_stage[label] / n:>6.2f}"
                  f"{stages.cpu[label] * 1000 / batches:>19.3f}{stages.by_stage[label] / batches:>6.2f}")
        kinds = ", ".join(f"{kind} {k / n:.2f}" for kind, k in sorted(stages.statements.items(), key=lambda kv: -kv[1]))
        print(f"  per delivery: {found['statements']:.2f} statements ({kinds}), {stages.sql_wall * 1000 / n:.3f} ms wall in"
              f" cursor.execute; {found['transactions']:.2f} transactions, {found['commits']:.2f} commits,"
              f" {found['rollbacks']:.2f} rollbacks, {found['checkouts']:.2f} pool checkouts"
              f" ({found['pings']:.2f} tested, idle over DATABASE_PING_AFTER {out['pre_ping']:g} s);"
              f" round trips to the database {found['round_trips']:.2f} (statements + BEGIN + COMMIT + ROLLBACK + tests)")
    print(f"\ncProfile of the backlog shape once more ({count} deliveries; profiler overhead included):")
    print(out["cprofile"])


def terminated(*_) -> None:
    """SIGTERM: exit through the ``finally`` clauses (children stopped, keys and database
    dropped); a second SIGTERM does not cut that cleanup short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500, help="deliveries per peer and round (default 500)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the peers' order rotated; 0: only --profile (default 3)")
    parser.add_argument("--concurrency", type=int, default=2, help="each worker's --concurrency (default 2)")
    parser.add_argument("--endpoint-concurrency", type=int, default=0, metavar="N",
                        help="the gateway's WEBHOOK_ENDPOINT_CONCURRENCY (default: its own, raised to --concurrency when lower)")
    parser.add_argument("--sequential", type=int, default=50, help="deliveries per peer sent one at a time for latency; 0: none (default 50)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds one round may take (default 300)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="then deliver N in this process in two shapes, stages timed, and N more under cProfile (default 0: no)")
    parser.add_argument("--py-spy", nargs="?", const=shutil.which("py-spy") or "py-spy", default=None, metavar="PATH",
                        help="then sample the gateway worker with py-spy during one more burst of the first gateway peer of --peers (default: py-spy on PATH)")
    parser.add_argument("--peers", default=",".join(PEERS), metavar="A,B",
                        help=f"the peers to run, comma-separated (default: all, {','.join(PEERS)}); a target is reported when both its peers ran")
    parser.add_argument("--logs", type=Path, default=None, metavar="DIR",
                        help="copy the processes' output (workers, beat, web, receiver) to DIR at the end (default: not kept)")
    args = parser.parse_args()
    wanted = {name.strip() for name in args.peers.split(",") if name.strip()}
    if wanted - set(PEERS) or not wanted:
        parser.error(f"--peers: choose among {', '.join(PEERS)} (got {args.peers!r})")
    args.peers = tuple(name for name in PEERS if name in wanted)
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
    # The children import this checkout's app and tasks too (see sys.path above).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    signal.signal(signal.SIGTERM, terminated)  # so that the cleanup in finally runs
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
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for path in [*tmp.glob("*.out"), *tmp.glob("*.err")]:
                shutil.copy(path, args.logs / path.name)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
