"""Request id: keep a sane client ``X-Request-ID`` or make one; echo it on every response."""
from __future__ import annotations

import re
import uuid

from flask import Flask, g, request
from werkzeug.wrappers import Response

HEADER = "X-Request-ID"
_SANE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def accept_or_generate(value: str | None) -> str:
    """Return ``value`` when it is a sane id (1-128 visible URL-safe characters), else a new one.

    A client-chosen id is kept so one id follows the work through every hop; anything that
    could break a log line or a header (spaces, control characters, very long) is replaced.
    """
    if value and _SANE.match(value):
        return value
    return uuid.uuid4().hex


def _before() -> None:
    g.request_id = accept_or_generate(request.headers.get(HEADER))


def _after(response: Response) -> Response:
    response.headers[HEADER] = g.get("request_id") or accept_or_generate(None)
    return response


def init_app(app: Flask) -> None:
    """Give every request, the gateway's own included, an id before anything else runs."""
    app.before_request_funcs.setdefault(None, []).insert(0, _before)
    app.after_request(_after)
