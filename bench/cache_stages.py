"""Where a cache hit's time goes, in one process: CPU per request of the Flask hello-world, the
gateway's /healthz, and a hit on a ``cache: {ttl: 600, public: true}`` route, whole and with
pieces left out, and alone and in ``--threads`` threads at once; with ``--redis`` also the
store's MGET through redis-py and over a plain socket. (A hit is served by the proxy app, which
has no framework hooks to time.)

Each app is called as a WSGI callable with a prebuilt environ (no server, no socket), so the
numbers leave out what gunicorn adds per request. Best of five batches of ``--requests``.
``--redis`` uses the Redis store (REDIS_URL, default redis://127.0.0.1:6379/0) under a unique
key prefix whose keys are deleted at the end; without it the in-process LRU. The access log
goes to /dev/null. Used for the findings in bench/README.md; ``python bench/cache_stages.py``.
"""
from __future__ import annotations

import argparse
import gc
import io
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import cache_hello
import cache_upstreams

ROUTE_FILE = """\
upstreams:
  tiny: {{targets: ["http://127.0.0.1:{port}"]}}
routes:
  - path: /cached
    upstream: tiny
    strip_prefix: true
    auth: none
    rate_limit: none
    cache: {{ttl: 600, public: true}}
"""


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


def environ(path: str) -> dict:
    return {
        "REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "RAW_URI": path,
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "wrk",
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
        "wsgi.multithread": True, "wsgi.multiprocess": True, "wsgi.run_once": False,
    }


def call(app, path: str) -> str:
    """One request through ``app``; the status line."""
    seen = []
    body = app(environ(path), lambda status, headers, exc_info=None: seen.append((status, headers)))
    b"".join(body)
    if hasattr(body, "close"):
        body.close()
    return seen[0][0]


def cpu_us(fn, n: int) -> float:
    """CPU microseconds per call of ``fn``: the best of five batches of ``n``, after a warm-up."""
    for _ in range(300):
        fn()
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - started) / n * 1e6)
    return best


def threaded_cpu_us(fn, n: int, threads: int) -> float:
    """CPU microseconds of the whole process per call of ``fn`` when ``threads`` threads call it
    ``n`` times each at once, as a gthread worker's threads do: the best of three rounds."""
    def work() -> None:
        for _ in range(n):
            fn()

    best = float("inf")
    for _ in range(3):
        pool = [threading.Thread(target=work) for _ in range(threads)]
        started = time.process_time()
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
        best = min(best, (time.process_time() - started) / (n * threads) * 1e6)
    return best


def raw_mget(redis_url: str, keys: list[str]):
    """The MGET the Redis store sends, written and read over a plain socket (RESP by hand): the
    round trip without the client library, to tell the library's cost from the exchange's."""
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    words = [b"MGET", *(key.encode() for key in keys)]
    command = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(word), word) for word in words)
    buffer = bytearray(1 << 16)

    def mget() -> None:
        sock.sendall(command)
        sock.recv_into(buffer)  # the answer is small: one read holds it

    return mget, sock


def stored_keys(store, prefix: str) -> list[str]:
    """The cache's keys under ``prefix``: Redis's, or the in-process LRU's (the key format is
    the cache stage's own business, so it is read back rather than rebuilt here)."""
    if hasattr(store, "client"):
        return sorted(key.decode() for key in store.client.scan_iter(match=f"{prefix}:cache:*"))
    return sorted(key for key in store._entries if key.startswith(f"{prefix}:cache:"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=4000, help="requests per batch (default 4000)")
    parser.add_argument("--redis", action="store_true", help="the Redis store instead of the in-process LRU")
    parser.add_argument("--threads", type=int, default=8, help="threads for the rows run concurrently (default 8, as WEB_THREADS)")
    args = parser.parse_args()
    n = args.requests

    upstream = make_server("127.0.0.1", 0, cache_upstreams.tiny, handler_class=QuietHandler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="frontdoor-cache-stages-"))
    (tmp / "routes.yaml").write_text(ROUTE_FILE.format(port=upstream.server_port))
    prefix = f"bench-{secrets.token_hex(4)}"
    redis_url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    os.environ.update(
        GATEWAY_CONFIG=str(tmp / "routes.yaml"),
        DATABASE_URL=f"sqlite:///{tmp / 'frontdoor.sqlite'}",
        GATEWAY_CELERY_BROKER_URL=f"sqla+sqlite:///{tmp / 'broker.sqlite'}",
        GATEWAY_KEY_PREFIX=prefix,
        GATEWAY_RATELIMIT_DEFAULT="",
        GATEWAY_LOG_LEVEL="INFO",
        REDIS_URL=redis_url if args.redis else "",
    )
    os.environ.pop("GATEWAY_REDIS_URL", None)
    from app import create_app
    from app.observability import logging as gateway_logging

    app = create_app()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - open for the whole run
    for handler in logging.getLogger("frontdoor").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(devnull)
    gateway = app.extensions["gateway"]
    store = gateway.settings.cache_store
    try:
        first = call(app, "/cached")  # the miss that stores the entry
        gc.freeze()  # as gunicorn.conf.py's post_worker_init does
        gc.set_threshold(50_000, 20, 20)
        keys = stored_keys(store, prefix)
        vary_key = next((key for key in keys if key.endswith("|vary")), None)
        entry_key = next((key for key in keys if not key.endswith(("|vary", ":lock"))), None)
        if vary_key is None or entry_key is None:
            print(f"error: no cache entry after the first request ({first}); keys: {keys}", file=sys.stderr)
            return 1
        raw = store.get(entry_key)
        from werkzeug.datastructures import Headers

        from app.gateway.cachestore import Entry
        from app.gateway.types import GatewayRequest

        match = gateway.router.match("GET", "/cached", "/cached", Headers())

        def pipeline_only() -> None:
            req = GatewayRequest(
                method="GET", path="/cached", query="", headers=Headers([("Host", "x")]), body=None,
                client_addr="127.0.0.1", scheme="http", host="x", route=match.route, params=match.params,
                upstream_path=match.upstream_path, raw_path="/cached", request_id="r", principal=None,
            )
            response = match.handler(req)
            b"".join(response.body)
            response.close()

        rows = [
            ("Flask hello-world (bench/cache_hello.py)", cpu_us(lambda: call(cache_hello.app, "/"), n)),
            ("gateway GET /healthz (every hook, no route)", cpu_us(lambda: call(app, "/healthz"), n)),
            ("gateway cache hit, whole", cpu_us(lambda: call(app, "/cached"), n)),
            ("  the route's pipeline alone (body + cache stages)", cpu_us(pipeline_only, n)),
            ("    store.get of the |vary key and of the entry", cpu_us(lambda: (store.get(vary_key), store.get(entry_key)), n)),
            ("    Entry.decode", cpu_us(lambda: Entry.decode(raw), n)),
        ]
        if args.redis:
            mget, sock = raw_mget(redis_url, [vary_key, entry_key])
            rows.append(("    redis-py MGET of both keys, as the cache's lookup", cpu_us(lambda: store.get_many([vary_key, entry_key]), n)))
            rows.append(("    the same MGET over a plain socket", cpu_us(mget, n)))
            sock.close()
        access = logging.getLogger("frontdoor.access")
        level = access.level
        access.setLevel(logging.WARNING)
        rows.append(("gateway cache hit, access log off", cpu_us(lambda: call(app, "/cached"), n)))
        access.setLevel(level)
        # What the web workers do (gunicorn.conf.py): log lines written from a thread of their own.
        gateway_logging.write_in_background()
        threads = args.threads
        rows += [
            (f"Flask hello-world, {threads} threads at once", threaded_cpu_us(lambda: call(cache_hello.app, "/"), n // threads, threads)),
            (f"gateway cache hit, whole, {threads} threads at once", threaded_cpu_us(lambda: call(app, "/cached"), n // threads, threads)),
        ]
        gateway_logging.stop_background()
    finally:
        upstream.shutdown()
        devnull.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if args.redis:
            print(f"deleted {store.delete(f'{prefix}:*')} Redis keys under {prefix}:")
    print(f"CPU per request in one process, {'Redis at ' + redis_url if args.redis else 'in-process LRU'}, best of 5 x {n}:")
    for name, value in rows:
        print(f"  {value:8.1f} us  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
