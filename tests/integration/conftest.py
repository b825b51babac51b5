"""The real stack: httpbin and a bulk upstream under gunicorn, and the gateway under gunicorn."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests import services

GUNICORN = str(Path(sys.executable).parent / "gunicorn")


@pytest.fixture(scope="session", autouse=True)
def _migrated_templates():
    """The databases ``services.migrate`` copies from go at the end of the session."""
    yield
    services.drop_migrated()


@pytest.fixture(scope="session")
def httpbin_url(tmp_path_factory):
    """httpbin (from PyPI) served by gunicorn on loopback."""
    port = services.free_port()
    log = tmp_path_factory.mktemp("httpbin") / "httpbin.log"
    process = services.start(
        [GUNICORN, "-b", f"127.0.0.1:{port}", "-w", "2", "-k", "gthread", "--threads", "16", "--no-control-socket", "httpbin:app"], log=log
    )
    try:
        services.wait_for_http(f"http://127.0.0.1:{port}/get")
        yield f"http://127.0.0.1:{port}"
    finally:
        services.stop(process)


@pytest.fixture(scope="session")
def bulk_url(tmp_path_factory):
    """The bulk upstream (tests/integration/upstream_app.py) under gunicorn."""
    port = services.free_port()
    log = tmp_path_factory.mktemp("bulk") / "bulk.log"
    process = services.start(
        [GUNICORN, "-b", f"127.0.0.1:{port}", "-w", "1", "-k", "gthread", "--threads", "4", "--no-control-socket", "tests.integration.upstream_app:app"],
        log=log,
    )
    try:
        services.wait_for_port(port, process=process)
        yield f"http://127.0.0.1:{port}"
    finally:
        services.stop(process)


@pytest.fixture(scope="session")
def blackhole_url():
    """A server that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stopping = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stopping.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


@dataclass
class Gateway:
    """A gateway under gunicorn: its URL, master process and JSON log."""

    url: str
    process: object
    log: Path
    extra: list = field(default_factory=list)

    def log_lines(self) -> list[dict]:
        return services.json_lines(self.log.read_text())

    def worker_pids(self) -> list[int]:
        return [pid for pid, _, parent, _ in services.processes() if parent == self.process.pid]


@pytest.fixture(scope="session")
def start_gateway(tmp_path_factory):
    """Start gunicorn serving the gateway with a route file: ``start_gateway(routes, workers=2, **env)``."""
    started: list = []

    def launch(routes: str, workers: int = 2, **env: str) -> Gateway:
        root = tmp_path_factory.mktemp("gateway")
        route_path = root / "gateway.yaml"
        route_path.write_text(routes)
        port = services.free_port()
        log = root / "gateway.log"
        environment = {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": str(workers),
            "WEB_THREADS": "8",
            "GATEWAY_CONFIG": str(route_path),
            "DATABASE_URL": f"sqlite:///{root / 'gateway.sqlite'}",
            **env,
        }
        process = services.start([GUNICORN, "--config", "gunicorn.conf.py", "app:create_app()"], env=environment, log=log)
        started.append(process)
        services.wait_for_http(f"http://127.0.0.1:{port}/healthz")
        return Gateway(f"http://127.0.0.1:{port}", process, log)

    yield launch
    # SIGTERM to every gateway still running first, so that their graceful shutdowns overlap.
    for process in started:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
    for process in started:
        services.stop(process)


@dataclass
class CountingUpstream:
    """An HTTP server in the test process that answers 200 to anything and keeps each request's
    method and path, so a test can tell whether (and how often) an upstream was called."""

    url: str
    requests: list = field(default_factory=list)


@pytest.fixture
def counting_upstream():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen.append((self.command, self.path))
            body = json.dumps({"count": len(seen)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield CountingUpstream(f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# Chromium's switches for a page that can reach loopback and nothing else.
OFFLINE = (
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",  # loopback bypasses the proxy; anything else is refused
)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium through Selenium, offline but for loopback."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        services.unavailable("no chromium or chromedriver (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for switch in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,2000", *OFFLINE):
        options.add_argument(switch)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    session.set_page_load_timeout(30)
    yield session
    session.quit()
