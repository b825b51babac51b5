"""The `floor-requests` peer for bench/proxy.py: the least a Flask + requests proxy does (a Session, streaming)."""
import os

import requests
from flask import Flask, Response, request

UPSTREAM = os.environ["FLOOR_UPSTREAM"].rstrip("/")
session = requests.Session()
session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=int(os.environ.get("WEB_THREADS", "8"))))

app = Flask(__name__)


@app.route("/<path:path>")
def proxy(path):
    """Pass the GET through a pooled session and stream the body back; nothing else."""
    r = session.get(f"{UPSTREAM}/{path}", params=request.args, stream=True, timeout=30)
    return Response(r.raw.stream(65536, decode_content=False), r.status_code, headers=list(r.raw.headers.items()))
