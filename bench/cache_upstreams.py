"""The upstreams for bench/cache.py, plain WSGI functions served by gunicorn.

- ``tiny``: what the cached route fronts; a small JSON answer at once, no Cache-Control, so the
  route's own ``ttl`` decides.
- ``slow``: each of the aggregate's backends; sleeps ``CACHE_BENCH_BACKEND_MS`` (default 50) ms,
  then answers a small JSON object naming the path it was asked for.
"""
import json
import os
import time

TINY_BODY = b'{"hello": "world"}'
DELAY = float(os.environ.get("CACHE_BENCH_BACKEND_MS", "50")) / 1000


def tiny(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(TINY_BODY)))])
    return [TINY_BODY]


def slow(environ, start_response):
    time.sleep(DELAY)
    body = json.dumps({"path": environ.get("PATH_INFO", ""), "ok": True}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
