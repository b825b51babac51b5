"""A naive peer proxy for bench/proxy.py, written the way a user would: Flask plus one requests call per request."""
import os

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ["NAIVE_UPSTREAM"].rstrip("/")
# Hop-by-hop fields (RFC 9110 section 7.6.1) and the ones requests has already undone or will redo.
DROP = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-encoding", "content-length",
}

app = Flask(__name__)


@app.route("/", defaults={"path": ""}, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@app.route("/<path:path>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def proxy(path):
    url = UPSTREAM + request.full_path.rstrip("?")
    headers = {name: value for name, value in request.headers if name.lower() != "host"}
    r = requests.request(request.method, url, headers=headers, data=request.get_data(), timeout=30)
    out = [(name, value) for name, value in r.headers.items() if name.lower() not in DROP]
    return Response(r.content, r.status_code, headers=out)
