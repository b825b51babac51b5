"""A test upstream for what httpbin caps: very large streamed downloads and uploads."""
from __future__ import annotations

import json

CHUNK = 1024 * 1024


def app(environ, start_response):
    """``GET /bytes/N``: N zero bytes, generated as they are sent.
    ``POST /count``: reads the body in chunks; answers ``{"received": N}``.
    """
    path = environ["PATH_INFO"]
    if path.startswith("/bytes/"):
        total = int(path.rsplit("/", 1)[1])

        def body():
            block = b"\0" * CHUNK
            remaining = total
            while remaining > 0:
                piece = block[: min(CHUNK, remaining)]
                remaining -= len(piece)
                yield piece

        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(total))])
        return body()
    if path == "/count":
        stream = environ["wsgi.input"]
        received = 0
        while chunk := stream.read(CHUNK):
            received += len(chunk)
        payload = json.dumps({"received": received}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]
