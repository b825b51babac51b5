"""Helpers for tests that run real processes: free ports, waiting, process groups, services."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
REQUIRE_SERVICES = os.environ.get("FRONTDOOR_REQUIRE_SERVICES") == "1"


class LogRecords(logging.Handler):
    """Keeps every record it is given; the frontdoor loggers do not propagate (JSON to
    stdout), so pytest's caplog never sees them: ``with logged("frontdoor.x") as records``."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, start: str) -> list[logging.LogRecord]:
        return [record for record in self.records if record.getMessage().startswith(start)]


@contextmanager
def logged(name: str):
    """Collect what the logger ``name`` writes while the block runs."""
    logger = logging.getLogger(name)
    records = LogRecords()
    logger.addHandler(records)
    try:
        yield records
    finally:
        logger.removeHandler(records)


def json_lines(text: str) -> list[dict]:
    """The JSON objects among a process's output lines (gunicorn's and Celery's own are not)."""
    lines = []
    for raw in text.splitlines():
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return lines


def unavailable(reason: str):
    """Skip, or fail when CI requires every service-backed test to run."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 15.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def wait_for_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1).close()
            return
        except requests.RequestException as exc:
            last = exc
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer in {timeout} s: {last}")


def start(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None, cwd: Path = ROOT) -> subprocess.Popen:
    """Start ``cmd`` in its own process group, output to ``log`` (or discarded)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    process._log_file = out  # type: ignore[attr-defined]
    return process


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Stop a process group started by ``start`` and return its exit code."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    log = getattr(process, "_log_file", None)
    if log not in (None, subprocess.DEVNULL):
        log.close()
    return process.returncode


class RedisServer:
    """A redis-server of a test's own on a free port, with no persistence, that the test may
    stop and start again on the same port (the shared server is never stopped)."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("no redis-server binary")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = start(self.command)
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@contextmanager
def throwaway_redis():
    """A redis-server on a free port, with no persistence; yields its URL."""
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    return None


@contextmanager
def throwaway_postgres():
    """A throwaway PostgreSQL cluster (initdb) on a free port; yields a URL to its ``postgres`` db."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        unavailable("no TEST_DATABASE_URL and no initdb/pg_ctl binaries")
    as_user: list[str] = []
    data = Path(tempfile.mkdtemp(prefix="frontdoor-pg-"))
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user
        runuser = shutil.which("runuser")
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if not (runuser and owner):
            unavailable("running as root with no postgres user to run a throwaway cluster")
        os.chown(data, owner.pw_uid, owner.pw_gid)
        as_user = [runuser, "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-l", str(data / "log"), "-o", f"-p {port} -k {data} -h 127.0.0.1", "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False, capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1, process: subprocess.Popen | None = None, log: Path | None = None):
    """Call ``predicate`` until it returns something truthy, and return that; TimeoutError
    naming ``what`` (with the tail of ``log``) after ``timeout`` seconds, RuntimeError at once
    if ``process`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {what}{_tail(log)}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not after {timeout} s{_tail(log)}")
        time.sleep(interval)


def _tail(log: Path | None, size: int = 4000) -> str:
    if log is None or not log.exists():
        return ""
    return f"\n--- {log} ---\n{log.read_text(errors='replace')[-size:]}"


def processes() -> list[tuple[int, str, int, int]]:
    """Every process as ``(pid, state, parent pid, process group)``, from /proc (proc(5))."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended while we looked
        found.append((int(stat.parent.name), fields[0], int(fields[1]), int(fields[2])))
    return found


def group_pids(pgid: int) -> list[int]:
    """The live (not zombie) processes of the process group ``pgid``."""
    return [pid for pid, state, _, group in processes() if state != "Z" and group == pgid]


def kill_group(process: subprocess.Popen, timeout: float = 10.0) -> list[int]:
    """SIGKILL the whole process group started by ``start`` (the main process and every child,
    with no chance to clean up), wait until none of it is left, and return the pids killed."""
    pids = group_pids(process.pid)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout)
    wait_until(lambda: not group_pids(process.pid), timeout, f"process group {process.pid} gone")
    stop(process)  # closes its log file
    return pids


# The release phase's schema, made once a session -------------------------------------------------

FLASK = str(BIN / "flask")
_MIGRATED: dict[str, str] = {}  # a database the release phase made, by kind: the copy source


def release_phase(env: dict[str, str]) -> None:
    """``flask --app app db upgrade`` on ``env["DATABASE_URL"]``, as the Procfile's release line runs it."""
    result = subprocess.run(
        [FLASK, "--app", "app", "db", "upgrade"], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=90, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def migrate(env: dict[str, str]) -> None:
    """Give the new, empty database of ``env["DATABASE_URL"]`` the schema the release phase makes.

    The release phase runs once per session and kind of database, into a template; each caller
    then gets a copy of it (a file copy for SQLite; ``CREATE DATABASE ... TEMPLATE`` for
    PostgreSQL): the same tables and alembic version, without starting a Python process that
    imports the gateway (1.5 s of CPU, 2-4 s on a loaded machine) per stack. test_migrations.py
    and test_deploy.py run the migrations themselves."""
    url = env["DATABASE_URL"]
    if url.startswith("sqlite:///"):
        target = Path(url.removeprefix("sqlite:///"))
        if "sqlite" not in _MIGRATED:
            template = Path(tempfile.mkdtemp(prefix="frontdoor-migrated-")) / "template.sqlite"
            release_phase({**env, "DATABASE_URL": f"sqlite:///{template}"})
            assert not Path(f"{template}-wal").exists(), "the template is one file"
            _MIGRATED["sqlite"] = str(template)
        assert not target.exists(), f"{target} is not a new database"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MIGRATED["sqlite"], target)
    elif url.startswith(("postgresql://", "postgres://")):
        import psycopg
        from sqlalchemy.engine import make_url

        parsed = make_url(url.replace("postgres://", "postgresql://", 1))
        admin = parsed.set(database="postgres").render_as_string(hide_password=False)
        server = f"postgres {parsed.host}:{parsed.port}"  # a template on each server used
        if server not in _MIGRATED:
            template = unique("frontdoor_migrated").replace("-", "_")
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
                connection.execute(f'CREATE DATABASE "{template}"')
            _MIGRATED[server] = admin.rsplit("/", 1)[0] + f"/{template}"
            release_phase({**env, "DATABASE_URL": _MIGRATED[server]})
        template = _MIGRATED[server].rsplit("/", 1)[1]
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP DATABASE "{parsed.database}"')
            connection.execute(f'CREATE DATABASE "{parsed.database}" TEMPLATE "{template}"')
    else:
        release_phase(env)


def drop_migrated() -> None:
    """Remove the templates ``migrate`` made (at the end of the session)."""
    if "sqlite" in _MIGRATED:
        shutil.rmtree(Path(_MIGRATED.pop("sqlite")).parent, ignore_errors=True)
    for server in [name for name in _MIGRATED if name.startswith("postgres ")]:
        import psycopg

        base, template = _MIGRATED.pop(server).rsplit("/", 1)
        with contextlib.suppress(psycopg.Error), psycopg.connect(f"{base}/postgres", autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')  # a throwaway cluster may be gone already

