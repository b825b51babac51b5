"""What tracing costs a request, in one process: CPU per proxied request (a route to a local
upstream) and per ``/healthz``, with ``OTEL_EXPORTER_OTLP_ENDPOINT`` unset (the W3C context
only, no instrumentation) and set (Flask, requests and Celery instrumented, spans exported in
batches to a local OTLP/HTTP sink that discards them).

Each variant runs in a process of its own (instrumentation is process-wide); each app is
called as a WSGI callable with a prebuilt environ. ``python bench/tracing.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from wsgiref.simple_server import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import cache_upstreams
from cache_stages import QuietHandler, call, cpu_us

ROUTE_FILE = """\
upstreams:
  tiny: {{targets: ["http://127.0.0.1:{port}"]}}
routes:
  - {{path: /plain, upstream: tiny, strip_prefix: true, auth: none, rate_limit: none}}
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP endpoint that accepts and discards every export."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def measure(n: int) -> dict[str, float]:
    """In this process: CPU microseconds per request, by request."""
    upstream = make_server("127.0.0.1", 0, cache_upstreams.tiny, handler_class=QuietHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="frontdoor-bench-tracing-"))
    (tmp / "routes.yaml").write_text(ROUTE_FILE.format(port=upstream.server_port))
    os.environ.update(
        GATEWAY_CONFIG=str(tmp / "routes.yaml"),
        DATABASE_URL=f"sqlite:///{tmp / 'frontdoor.sqlite'}",
        GATEWAY_CELERY_BROKER_URL=f"sqla+sqlite:///{tmp / 'broker.sqlite'}",
        GATEWAY_RATELIMIT_DEFAULT="",
        GATEWAY_LOG_LEVEL="WARNING",
        REDIS_URL="",
    )
    from app import create_app

    app = create_app()

    def with_traceparent(environ: dict, start_response):
        return app({**environ, "HTTP_TRACEPARENT": TRACEPARENT}, start_response)

    try:
        return {
            "GET /healthz": cpu_us(lambda: call(app, "/healthz"), n),
            "GET /plain (proxied)": cpu_us(lambda: call(app, "/plain/x"), n),
            "GET /plain with a traceparent": cpu_us(lambda: call(with_traceparent, "/plain/x"), n),
        }
    finally:
        upstream.shutdown()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch (default 2000)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # a variant's own process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.requests)))
        return 0
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    variants = {
        "OTEL_EXPORTER_OTLP_ENDPOINT unset": {},
        "OTEL_EXPORTER_OTLP_ENDPOINT set": {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}"},
    }
    results = {}
    for name, extra in variants.items():
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")} | extra
        done = subprocess.run(
            [sys.executable, __file__, "--measure", "--requests", str(args.requests)], env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            print(f"error: {name}: {done.stderr[-2000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    sink.shutdown()
    names = list(results)
    print(f"CPU per request in one process, best of 5 x {args.requests}:")
    print(f"  {'request':<32}" + "".join(f"{name:>36}" for name in names))
    for request in results[names[0]]:
        row = [results[name][request] for name in names]
        print(f"  {request:<32}" + "".join(f"{value:>33.1f} us" for value in row) + f"   x{row[1] / row[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
