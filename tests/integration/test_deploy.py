"""Deploying the Heroku way, end to end: a clean checkout of the working tree, installed as the
Python buildpack installs it (a fresh virtualenv, ``pip install -r requirements.txt`` and
nothing else: no dev tools, no editable install), the Procfile's release line, then
``honcho start -f Procfile`` with the environment Heroku sets (``PORT``,
``DATABASE_URL=postgres://…``, ``REDIS_URL``). A proxied call, a job and a signed webhook
delivery work; then SIGTERM reaches every process at once, as when Heroku stops a dyno, while a
request, two jobs and a delivery are in flight, and nothing is lost: the request is answered,
the short job and the delivery finish, the long job's message goes back to the queue, and a new
dyno finishes it and delivers every event published.

honcho SIGKILLs what is left 5 s after the first process exits; Heroku waits 30 s after its
SIGTERM, so the dyno here runs honcho with Heroku's wait. The worker's soft shutdown is 3 s
instead of 25, to keep the test short; leases and sweeps are compressed so that a new dyno
takes the long job over within seconds.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from cryptography.fernet import Fernet

from app import create_app
from app.extensions import db
from tests import services
from tests.factories import Identity
from tests.integration.test_webhooks import Api, Hold, Receiver

HEROKU_KILL_WAIT = 30  # seconds between Heroku's SIGTERM to a dyno's processes and its SIGKILL
# honcho's own command line, with its wait before the SIGKILL (honcho.manager.KILL_WAIT, 5 s)
# set to Heroku's: on a loaded machine a worker's cold shutdown may take longer than the 2 s
# that 5 s leaves after the soft shutdown.
HONCHO = [
    str(services.BIN / "python"),
    "-c",
    f"import sys, honcho.manager; honcho.manager.KILL_WAIT = {HEROKU_KILL_WAIT}; from honcho.command import main; main()",
]
FINAL = frozenset({"succeeded", "failed", "canceled"})
SOFT_SHUTDOWN = 3  # seconds a worker gives running tasks on SIGTERM (25 on Heroku)

ROUTES = """\
upstreams:
  httpbin:
    targets: ["{httpbin}"]
    timeout: {{connect: 1.0, read: 10.0}}
    job_timeout: {{connect: 1.0, read: 30.0}}
routes:
  - path: /httpbin
    upstream: httpbin
    strip_prefix: true
  - path: /async
    name: async
    upstream: httpbin
    strip_prefix: true
    mode: async
"""

# What the test sets besides Heroku's own variables: the loopback receiver is allowed, and
# timings are compressed so that a lost task is taken over within seconds.
SETTINGS = {
    "GATEWAY_WEBHOOK_ALLOW_HTTP": "true",
    "GATEWAY_WEBHOOK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',
    "GATEWAY_WEBHOOK_DISPATCH_INTERVAL": "0.5",
    "GATEWAY_WEBHOOK_REQUEUE_AFTER": "2",
    "GATEWAY_WEBHOOK_TIMEOUT": "4",
    "GATEWAY_WEBHOOK_LEASE": "10",
    "GATEWAY_JOB_LEASE": "4",
    "GATEWAY_JOB_SWEEP_INTERVAL": "1",
    "GATEWAY_JOB_REQUEUE_AFTER": "2",
    "GATEWAY_WORKER_SOFT_SHUTDOWN_TIMEOUT": str(SOFT_SHUTDOWN),
    "WEB_CONCURRENCY": "2",
    "WORKER_CONCURRENCY": "4",
}

# The caller's environment that must not reach the dyno: settings of the test run, and
# coverage's subprocess hooks (which would measure files in a directory about to be deleted).
NOT_INHERITED = ("GATEWAY_", "COV_CORE_", "COVERAGE_", "PROMETHEUS_MULTIPROC_DIR", "FLASK_", "DATABASE_URL", "REDIS_URL", "PORT", "PYTHONDONTWRITEBYTECODE")


def clean_checkout(destination: Path) -> Path:
    """Copy the working tree's files as git sees them (tracked and new, not ignored, as they are
    now, uncommitted changes included) to ``destination``: no virtualenv, no instance/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=services.ROOT, capture_output=True, check=True, timeout=30
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = services.ROOT / name
        if source.is_file():  # a file deleted in the working tree is still listed
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def procfile(root: Path) -> dict[str, str]:
    lines = (root / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip() and not line.startswith("#"))


@dataclass
class Dyno:
    """``honcho start -f Procfile web worker beat`` in the checkout: the formation, as Heroku runs
    it (honcho would run the release line too, and stop everything when it exits). honcho puts
    each process in a session of its own; their process groups are read from its output."""

    root: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None
    groups: dict[str, int] = field(default_factory=dict)

    def start(self) -> Dyno:
        self.process = services.start([*HONCHO, "start", "--no-colour", "-f", "Procfile", "web", "worker", "beat"], env=self.env, log=self.log, cwd=self.root)
        services.wait_until(lambda: len(self.read_groups()) == 3, 30, "honcho starting web, worker and beat", process=self.process, log=self.log)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def lines(self, process: str) -> list[str]:
        """What ``process`` (web, worker, beat, system) wrote, without honcho's prefix."""
        return re.findall(rf"^\S+ {process}(?:\.1)?\s*\| (.*)$", self.text(), re.MULTILINE)

    def read_groups(self) -> dict[str, int]:
        for name, pid in re.findall(r"(\w+)\.1 started \(pid=(\d+)\)", self.text()):
            self.groups[name] = int(pid)
        return self.groups

    def alive(self) -> list[int]:
        """The live processes of honcho's group and of every group it started."""
        return [pid for group in (self.process.pid, *self.read_groups().values()) for pid in services.group_pids(group)]

    def terminate(self, timeout: float = HEROKU_KILL_WAIT + 10) -> int:
        """SIGTERM to honcho's process group, as Heroku stops a dyno: honcho sends one SIGTERM
        to each process group it started. Returns honcho's exit code once every process is gone."""
        os.killpg(self.process.pid, signal.SIGTERM)
        code = self.process.wait(timeout)
        services.wait_until(lambda: not self.alive(), 10, "every process of the dyno gone", log=self.log)
        return code

    def kill(self) -> None:
        """SIGKILL whatever is left (a failed test); nothing of the dyno outlives the test."""
        if self.process is None:
            return
        for group in {self.process.pid, *self.read_groups().values()}:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        services.stop(self.process)
        services.wait_until(lambda: not self.alive(), 10, "every process of the dyno gone")


@dataclass
class Deploy:
    """A clean checkout, the environment Heroku gives it, its dynos, and its consumers."""

    root: Path
    env: dict[str, str]
    database: str  # the postgresql:// URL of the add-on's database, for the test's own use
    logs: Path
    dynos: list[Dyno] = field(default_factory=list)
    apps: list = field(default_factory=list)

    def dyno(self) -> Dyno:
        made = Dyno(self.root, self.env, self.logs / f"dyno-{len(self.dynos) + 1}.log")
        self.dynos.append(made)
        return made.start()

    def identity(self) -> Identity:
        """Consumers and keys, written straight into the dyno's database (after the release)."""
        app = create_app(
            {
                "CONFIG": self.env["GATEWAY_CONFIG"],
                "SQLALCHEMY_DATABASE_URI": self.database,
                "CELERY_BROKER_URL": "memory://",
                "WEBHOOK_SECRET_KEYS": self.env["GATEWAY_WEBHOOK_SECRET_KEYS"],
            }
        )
        self.apps.append(app)
        return Identity(app)

    def close(self) -> None:
        """Kill every dyno's processes and close the test's own database connections."""
        try:
            for made in self.dynos:
                made.kill()
        finally:
            for app in self.apps:
                with app.app_context():
                    db.engine.dispose()


def buildpack_install(root: Path, venv: Path) -> Path:
    """What the Python buildpack does with a checkout holding ``requirements.txt``: a virtualenv
    of its own and ``pip install -r requirements.txt`` into it. Returns the virtualenv's bin."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", "-r", "requirements.txt"],
        cwd=root, capture_output=True, text=True, timeout=600, check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv / "bin"


@pytest.fixture
def deploy(tmp_path, httpbin_url, redis_url, key_prefix, postgres_database):
    """A clean checkout installed from its lock, and Heroku's environment for it; nothing of it
    outlives the test."""
    root = clean_checkout(tmp_path / "app")
    slug_bin = buildpack_install(root, tmp_path / "venv")
    route_file = tmp_path / "gateway.yaml"
    route_file.write_text(ROUTES.format(httpbin=httpbin_url))
    env = {name: value for name, value in os.environ.items() if not name.startswith(NOT_INHERITED)}
    env.update(
        SETTINGS,
        PATH=f"{slug_bin}{os.pathsep}{os.environ['PATH']}",  # the buildpack's Python first
        PORT=str(services.free_port()),
        DATABASE_URL=postgres_database.replace("postgresql://", "postgres://", 1),  # as Heroku Postgres gives it
        REDIS_URL=redis_url,
        GATEWAY_KEY_PREFIX=key_prefix,
        GATEWAY_WEBHOOK_SECRET_KEYS=Fernet.generate_key().decode(),
        GATEWAY_CONFIG=str(route_file),
    )
    built = Deploy(root, env, postgres_database, tmp_path)
    try:
        yield built
    finally:
        built.close()


def ready(base: str) -> bool:
    """Whether the web process answers /readyz with 200 (database and Redis reachable)."""
    try:
        return requests.get(f"{base}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture
def receiver():
    """The webhook receiver (test_webhooks.Receiver), on loopback, stopped when the test ends."""
    made = Receiver().start()
    yield made
    made.stop()


def follow(api: Api, location: str, timeout: float, until=FINAL, dyno: Dyno | None = None) -> dict:
    def status():
        job = requests.get(location, headers={"X-API-Key": api.key}, timeout=10).json()
        return job if job["status"] in until else None

    return services.wait_until(status, timeout, f"job {location} in {sorted(until)}", interval=0.2, log=dyno.log if dyno else None)


def delivered(receiver: Receiver, path: str, message_id: str) -> list:
    return [seen for seen in receiver.on(path) if seen.webhook_id == message_id and seen.verified and seen.answered == 200]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_a_clean_checkout_deploys_serves_and_stops_on_sigterm_without_losing_work(deploy, receiver):
    root, env, dyno = deploy.root, deploy.env, deploy.dyno
    assert not (root / "instance").exists() and not (root / ".venv").exists()
    slug_bin = env["PATH"].split(os.pathsep)[0]
    # The lock installs the runtime only: no dev or demo tool, no OpenTelemetry.
    assert not any(Path(slug_bin, tool).exists() for tool in ("pytest", "honcho", "ruff")), sorted(os.listdir(slug_bin))

    # The release phase, as Heroku runs it: the Procfile's line through a shell.
    release = subprocess.run(procfile(root)["release"], shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert release.returncode == 0, release.stdout + release.stderr

    first = dyno()
    base = f"http://127.0.0.1:{env['PORT']}"
    services.wait_until(lambda: ready(base), 60, "/readyz", log=first.log)
    services.wait_until(lambda: any(" ready." in line for line in first.lines("worker")), 60, "the worker ready", log=first.log)
    # Web, worker and beat run on the buildpack's virtualenv.
    for name, group in first.read_groups().items():
        commands = [" ".join(cmdline(pid)) for pid in services.group_pids(group)]
        assert any(slug_bin in command for command in commands), (name, commands)
    # The processes run the checkout's code (its bytecode is cached beside it), not the working tree's.
    assert (root / "app" / "__pycache__").is_dir() and (root / "tasks" / "__pycache__").is_dir()

    identity = deploy.identity()
    api = Api(base, identity.key())

    # A proxied call.
    proxied = api.call("GET", "/httpbin/get?deploy=1")
    assert proxied.json()["args"] == {"deploy": "1"}

    # A job, to completion.
    submitted = api.call("GET", "/async/get?job=1", expect=202)
    job = follow(api, submitted.headers["Location"], 30, dyno=first)
    assert job["status"] == "succeeded", job
    assert api.call("GET", f"/_gateway/jobs/{job['id']}/result").json()["args"] == {"job": "1"}

    # A webhook endpoint registered through the API gets a signed event it can verify.
    orders = api.create_endpoint(receiver.url("/orders"), event_types=["order.*"])
    receiver.secrets["/orders"] = [orders["secret"]]
    placed = api.publish("order.placed", {"order": 1})
    services.wait_until(lambda: delivered(receiver, "/orders", placed["id"]), 30, "order.placed delivered", log=first.log)

    # Work in flight when the dyno is stopped: a delivery the receiver holds, a job that ends
    # within the soft shutdown, one that does not, a proxied request to a slow upstream, and an
    # event published a moment before.
    held = api.create_endpoint(receiver.url("/held"), event_types=["report.*"])
    receiver.secrets["/held"] = [held["secret"]]
    hold = receiver.holds["/held"] = Hold()
    report = api.publish("report.ready", {"report": 7})
    assert hold.arrived.wait(30), first.text()[-3000:]
    short = api.call("GET", "/async/delay/2", expect=202).headers["Location"]
    long = api.call("GET", "/async/delay/8", expect=202).headers["Location"]
    follow(api, short, 15, until={"running"}, dyno=first)
    follow(api, long, 15, until={"running"}, dyno=first)
    answered: dict[str, object] = {}

    def slow_request():
        try:
            response = requests.get(f"{base}/httpbin/delay/3", headers={"X-API-Key": api.key}, timeout=30)
            answered["status"] = response.status_code
        except requests.RequestException as exc:
            answered["error"] = exc

    client = threading.Thread(target=slow_request)
    client.start()
    time.sleep(0.5)  # the request is with the upstream
    late = api.publish("order.shipped", {"order": 1})

    stopping = time.monotonic()
    threading.Timer(1.0, hold.release.set).start()  # the receiver answers the held delivery during the shutdown
    first.terminate()
    stopped_after = time.monotonic() - stopping
    client.join(30)

    output = first.text()
    assert answered == {"status": 200}, output[-3000:]  # the in-flight request was answered
    # Everything stopped by itself, the worker after handing its unfinished message back, well
    # inside Heroku's 30 s: nothing had to be killed.
    assert re.search(r"Restoring \d+ unacknowledged message", output), output[-3000:]
    assert "sending SIGKILL" not in output, output[-3000:]
    assert stopped_after < SOFT_SHUTDOWN + 10, output[-3000:]
    # (honcho reports the exit code of the shell running each line, which the SIGTERM ends too.)
    web_lines = first.lines("web")
    assert "Shutting down: Master" in "\n".join(web_lines), output[-3000:]
    # The web dyno's every line is JSON, gunicorn's own included.
    assert web_lines and len(services.json_lines("\n".join(web_lines))) == len(web_lines), web_lines[-20:]
    worker_lines = "\n".join(first.lines("worker"))
    assert f"Initiating Soft Shutdown, terminating in {SOFT_SHUTDOWN}" in worker_lines, worker_lines[-3000:]
    assert re.search(r"Restoring \d+ unacknowledged message", worker_lines), worker_lines[-3000:]
    assert delivered(receiver, "/held", report["id"])  # the held delivery finished in the soft shutdown

    # A new dyno: the short job ended before, the long one is taken over, every event arrives.
    second = dyno()
    services.wait_until(lambda: ready(base), 60, "/readyz again", log=second.log)
    assert follow(api, short, 10, dyno=second)["status"] == "succeeded"
    retried = follow(api, long, 60, dyno=second)
    assert retried["status"] == "succeeded", retried
    for path, message in (("/orders", placed), ("/held", report), ("/orders", late)):
        services.wait_until(lambda: delivered(receiver, path, message["id"]), 30, f"{message['type']} delivered", log=second.log)  # noqa: B023
    # The second dyno only had to finish the work; how fast it stops under load is not the point.
    assert second.terminate() is not None


def test_the_worker_gives_running_tasks_25_s_on_sigterm_then_requeues_them(make_app):
    """Heroku's SIGKILL comes 30 s after its SIGTERM: the soft shutdown ends before it, and the
    Procfile remaps SIGTERM so that it starts one (Celery's own SIGTERM waits without limit)."""
    assert "REMAP_SIGTERM=SIGQUIT celery -A tasks worker" in procfile(services.ROOT)["worker"]

    conf = make_app().extensions["celery"].conf
    assert (conf.worker_soft_shutdown_timeout, conf.worker_enable_soft_shutdown_on_idle) == (25.0, False)
    assert conf.task_acks_late and conf.task_reject_on_worker_lost  # a message is never acked before its task ends

    conf = make_app(WORKER_SOFT_SHUTDOWN_TIMEOUT=3, WORKER_SOFT_SHUTDOWN_ON_IDLE=True).extensions["celery"].conf
    assert (conf.worker_soft_shutdown_timeout, conf.worker_enable_soft_shutdown_on_idle) == (3.0, True)
