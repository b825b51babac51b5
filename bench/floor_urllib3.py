"""The floor peer for bench/proxy.py: Flask around one shared urllib3 connection pool (the Python floor).

One view, one ``urlopen`` on a pool the worker's threads share, the body streamed back as it
arrives. No route table, breaker, retry, bulkhead, request id or log line: what Flask, gunicorn
and urllib3 cost before a gateway does anything.
"""
import os

import urllib3
from flask import Flask, Response, request

UPSTREAM = os.environ["FLOOR_UPSTREAM"].rstrip("/")
# Hop-by-hop fields (RFC 9110 section 7.6.1), dropped both ways as the naive peer does. The
# upstream's body goes back byte for byte (not decoded), so its Content-Length and
# Content-Encoding stay true and are kept. Host and Content-Length of the request are
# recomputed by urllib3; gunicorn writes its own Date and Server (both singleton fields).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

# One pool per worker process, as many keep-alive connections as the worker has threads.
pool = urllib3.connection_from_url(
    UPSTREAM, maxsize=int(os.environ.get("WEB_THREADS", "8")), timeout=urllib3.Timeout(connect=1.0, read=30.0)
)

app = Flask(__name__)


@app.route("/", defaults={"path": ""}, methods=METHODS)
@app.route("/<path:path>", methods=METHODS)
def proxy(path):
    """Forward the request as sent (gunicorn's raw target) and stream the upstream's answer back."""
    headers = {name: value for name, value in request.headers if name.lower() not in REQUEST_DROP}
    r = pool.urlopen(
        request.method, request.environ.get("RAW_URI") or request.full_path, body=request.get_data() or None,
        headers=headers, retries=False, redirect=False, preload_content=False, decode_content=False,
    )
    out = [(name, value) for name, value in r.headers.items() if name.lower() not in RESPONSE_DROP]
    # Read to its end, the response puts its connection back in the pool.
    return Response(r.stream(65536, decode_content=False), r.status, headers=out)
