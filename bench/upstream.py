"""The fast upstream for bench/proxy.py: a WSGI app that answers every request with the same 2 KB JSON."""
import json

BODY = json.dumps({"ok": True, "items": [{"id": i, "name": f"item-{i:04d}", "tags": ["a", "b"]} for i in range(40)]}).encode()
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    """Drain any request body, then return the fixed 200."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length:
        environ["wsgi.input"].read(length)
    start_response("200 OK", HEADERS)
    return [BODY]
