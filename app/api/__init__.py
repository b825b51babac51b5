"""The gateway's own resources under ``API_PREFIX`` (``/_gateway``), one blueprint per resource."""
from __future__ import annotations

from flask import Flask, Response, current_app, request
from flask_compress import Compress

from app.api import (
    admin_cache,
    admin_gateway,
    consumers,
    events,
    inputs,
    jobs,
    keys,
    openapi,
    problems,
    webhooks,
)

MODULES = (consumers, keys, jobs, webhooks, events, admin_cache, admin_gateway, openapi, problems)


# The Flask app's answers (the gateway's own API, its problems and pages, /metrics) are gzipped
# for a client that accepts it (RFC 9110 section 8.4), from 500 bytes; the proxy's are the
# upstream's own, and so is a job's result. Files and streamed answers are sent as they are.
COMPRESSION = {
    "COMPRESS_ALGORITHM": "gzip",
    "COMPRESS_MIMETYPES": ["application/json", "application/problem+json", "text/html", "text/plain"],
    "COMPRESS_MIN_SIZE": 500,  # bytes
    "COMPRESS_LEVEL": 6,
    "COMPRESS_STREAMS": False,
}


class _Compress(Compress):
    """Flask-Compress, but a view marked ``@as_stored`` (common.as_stored: a job's result, the
    upstream's answer byte for byte) is sent as it is, and so is one marked ``carries_secrets``
    (the portal's pages: a compressed page holding a token and reflecting a query is what
    BREACH reads the token from)."""

    def after_request(self, response: Response) -> Response:
        view = current_app.view_functions.get(request.endpoint or "")
        if getattr(view, "as_stored", False) or getattr(view, "carries_secrets", False):
            return response
        return super().after_request(response)


def init_app(app: Flask) -> None:
    """Register every resource's blueprint under API_PREFIX, after the limits at its edge
    (``inputs``: the ``id`` converter its rules use, the query check), and compression."""
    for name, value in COMPRESSION.items():
        app.config.setdefault(name, value)
    _Compress(app)
    inputs.init_app(app, frozenset(module.bp.name for module in MODULES))
    prefix = app.config["API_PREFIX"].rstrip("/")
    for module in MODULES:
        app.register_blueprint(module.bp, url_prefix=prefix)
